"""`python -m rdsproxy` runs the command line."""
from .cli import main

main()
