"""A cheap first look at SQL text: could any trigger keyword be in it? (case-insensitive)

Pure-Python twin of `keywords_c`, which setup.py compiles from this very file with
`keywords_c.pxd`. The engines' rules (which statements pin a session) are far too rich to
run on every statement; this scanner answers the common question "certainly nothing of
interest here?" and sends only the rest to the full analysis. It may say yes too often,
never too rarely.

Two kinds of triggers:
  leading: a word (or a comment opener) at the start of a statement, i.e. at the start
           of the text or after a ';', past blanks: SET, RESET, /* ...
  anywhere: a fragment anywhere in the text: "temp", "tval", ...
A leading word must end at a word boundary (not followed by [a-z0-9_]); comment openers
("/*", "--") and fragments need not.
"""
import re

try:
    import cython
except ImportError:
    globals()["cython"] = type("cython", (), {"compiled": False})


class KeywordScanner:
    """`may_match(sql_bytes)`: True when a trigger could be present (see module doc)."""

    def __init__(self, leading, anywhere):
        self.leading = [w.lower() for w in leading]
        self.anywhere = [w.lower() for w in anywhere]
        # The pure twin uses the regex engine (fast in CPython); the compiled twin a C loop.
        self._regex = re.compile(
            rb";[\s\x00]*(?:" + b"|".join(
                re.escape(w) + (rb"(?![a-z0-9_])" if w[:1].isalpha() else b"")
                for w in self.leading) + rb")"
            + b"".join(b"|" + re.escape(w) for w in self.anywhere))
        first = bytearray(256)
        for w in self.anywhere:
            first[w[0]] = 1
        self._anywhere_first = first

    def may_match(self, data):
        if not cython.compiled:
            return self._regex.search(b";" + bytes(data).lower()) is not None
        return self._scan(data, len(data))

    def _scan(self, buf, end):
        # Compiled twin only: one pass, lower-casing ASCII letters on the fly.
        at_start = True
        i = 0
        while i < end:
            c = buf[i]
            if 65 <= c <= 90:
                c += 32
            if at_start:
                if c == 32 or 9 <= c <= 13 or c == 0:
                    i += 1
                    continue
                at_start = False
                for word in self.leading:
                    if self._matches_at(buf, end, i, word):
                        n = len(word)
                        if word[0] < 97 or i + n >= end or not _word_byte(buf[i + n]):
                            return True
            if c == 59:  # ';' starts the next statement
                at_start = True
            elif self._anywhere_first[c]:
                for word in self.anywhere:
                    if self._matches_at(buf, end, i, word):
                        return True
            i += 1
        return False

    def _matches_at(self, buf, end, i, word):
        n = len(word)
        if i + n > end:
            return False
        for k in range(n):
            c = buf[i + k]
            if 65 <= c <= 90:
                c += 32
            if c != word[k]:
                return False
        return True


def _word_byte(c):
    """[A-Za-z0-9_]: what continues a word."""
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95
