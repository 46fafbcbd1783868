"""The usual Lambda + RDS Proxy IAM pattern, pointed at rdsproxy.

Nothing here is rdsproxy-specific: the same code talks to AWS RDS Proxy. Only the
environment differs (DB_HOST/DB_PORT name the rdsproxy endpoint; the AWS credentials are
those of a principal listed in the proxy's [[iam.principals]]).
"""
import json
import os

import boto3
import psycopg2

DB_HOST = os.environ["DB_HOST"]                      # RDS: the proxy endpoint's DNS name
DB_PORT = int(os.environ.get("DB_PORT", "5432"))
DB_USER = os.environ.get("DB_USER", "app")
DB_NAME = os.environ.get("DB_NAME", "app")
REGION = os.environ.get("AWS_REGION", "us-east-1")

# Created once per Lambda container; credentials come from the environment (in Lambda: the
# function's role, including AWS_SESSION_TOKEN).
rds = boto3.client("rds", region_name=REGION)


def get_db_connection():
    # A token is a SigV4-signed URL, valid for 15 minutes, made locally (no AWS call).
    token = rds.generate_db_auth_token(DBHostname=DB_HOST, Port=DB_PORT,
                                       DBUsername=DB_USER, Region=REGION)
    return psycopg2.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, password=token,
                            dbname=DB_NAME, sslmode="require")


def lambda_handler(event, context):
    conn = get_db_connection()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, now()")
            user, now = cur.fetchone()
        return {"statusCode": 200, "body": json.dumps({"user": user, "time": now.isoformat()})}
    finally:
        conn.close()
