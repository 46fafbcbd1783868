"""A cheap first look at SQL text: could any trigger keyword be in it? (case-insensitive)

Pure-Python twin of `pg_keywords_c`, which setup.py compiles from this very file with
`pg_keywords_c.pxd`. The engines' rules (which statements pin a session) are far too rich to
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
        # The compiled scan's first test at each position: could a word start with these
        # two (lower-cased) bytes? Most positions of ordinary SQL fail it, so the word
        # lists are only walked where a match is likely.
        self._leading_pairs = _pair_table(self.leading)
        self._anywhere_pairs = _pair_table(self.anywhere)
        self._anywhere_first = bytearray(256)   # the first bytes of the fragments
        for w in self.anywhere:
            self._anywhere_first[w[0]] = 1

    def may_match(self, data):
        if not cython.compiled:
            return self._regex.search(b";" + bytes(data).lower()) is not None
        return self._scan(data, len(data))

    def _scan(self, buf, end):
        # Compiled twin only: one pass, lower-casing through a table. Most bytes of ordinary
        # SQL cannot start an "anywhere" fragment, so the next byte is only read where one
        # could. The tables are read through C pointers, unchecked: a byte is < 256 and a
        # pair < 65536, their sizes.
        lower = _LOWER
        leading_pairs = self._leading_pairs
        anywhere_pairs = self._anywhere_pairs
        anywhere_first = self._anywhere_first
        at_start = True
        i = 0
        while i < end:
            c = lower[buf[i]]
            if at_start:
                if c == 32 or 9 <= c <= 13 or c == 0:
                    i += 1
                    continue
                at_start = False
                pair = (c << 8) | (lower[buf[i + 1]] if i + 1 < end else 0)
                if leading_pairs[pair]:
                    for word in self.leading:
                        if self._matches_at(buf, end, i, word):
                            n = len(word)
                            if word[0] < 97 or i + n >= end or not _word_byte(buf[i + n]):
                                return True
            if c == 59:  # ';' starts the next statement
                at_start = True
            elif anywhere_first[c]:
                pair = (c << 8) | (lower[buf[i + 1]] if i + 1 < end else 0)
                if anywhere_pairs[pair]:
                    for word in self.anywhere:
                        if self._matches_at(buf, end, i, word):
                            return True
            i += 1
        return False

    def _matches_at(self, buf, end, i, word):
        n = len(word)
        if i + n > end:
            return False
        lower = _LOWER
        for k in range(n):
            if lower[buf[i + k]] != word[k]:
                return False
        return True


_LOWER = bytes(range(256)).lower()   # each byte lower-cased (ASCII letters only)


def _pair_table(words):
    """65536 flags, one per (byte, next byte): set where one of `words` (lower case) starts
    with that pair. A one-byte word flags every pair it begins; the last byte of a text is
    looked up with 0 as its next byte."""
    table = bytearray(65536)
    for w in words:
        if len(w) == 1:
            table[w[0] << 8:(w[0] + 1) << 8] = b"\x01" * 256
        else:
            table[(w[0] << 8) | w[1]] = 1
    return table


def _word_byte(c):
    """[A-Za-z0-9_]: what continues a word."""
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 95
