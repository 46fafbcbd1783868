"""Engine-agnostic helpers for the pinning rules' SQL token lists ((kind, value) pairs)."""


def split_statements(tokens: list, semicolon: tuple) -> list[list]:
    """The statements of a token list: the runs between `semicolon` tokens, empty ones dropped."""
    statements, current = [], []
    for tok in tokens:
        if tok == semicolon:
            if current:
                statements.append(current)
            current = []
        else:
            current.append(tok)
    if current:
        statements.append(current)
    return statements
