"""Intent rules: which intent a caller's words express, from phrases and patterns.

An intents file belongs to one campaign and language. It is TOML or JSON (chosen by
the file's suffix), or the same structure as a JSON object from the dialer::

    language = "ko"
    [intents.yes]
    phrases = ["네", "예", "맞아요"]
    examples = ["네 맞아요"]          # for the LLM fallback's prompt (farm/llm.py)
    [intents.callback]
    phrases = ["나중에 전화"]
    patterns = ["바쁘(다|니까|거든)"]

Matching rules (the decisions this module implements):

* **Normalisation.** Text and phrases are NFC-normalised and lowercased; punctuation
  becomes a space and whitespace runs collapse to one space. Only the first
  :data:`MAX_TEXT_CHARS` characters of a text are matched: partials grow at their
  end, so the matched prefix stays stable.
* **Spacing.** Vosk's Korean spacing varies ("전화 하지 마", "전화하지 마", "맞 습니다"),
  so a phrase matches whatever the spaces between its characters.
* **Word boundaries.** A phrase of one character after removing its spaces ("네",
  "예") matches only as a whole word: "네" is not in "네이버", "예" not in "예약".
  A phrase of two or more Hangul characters matches inside words too, because Korean
  glues particles and endings on ("다시 전화" in "다시전화해 주세요"). A phrase with
  any non-Hangul character ("ok", "ars") matches only as a whole word, as in
  languages that space their words.
* **Priority.** Each intent's hit is its longest match, measured in characters
  without spaces (so spacing does not change the outcome). The intent with the
  longest hit wins; ties go to the intent listed first. The other intents that also
  matched are reported in ``also``, best first: "네 아니요" is ``no`` (3 characters
  beat 1) with ``also=("yes",)``. Negation works by listing the negated phrase:
  "안 좋아요" in ``no`` outruns "좋아요" in ``yes``.
* **Patterns** are regular expressions matched, case-insensitively, against the
  normalised text (single spaces, lowercase), so write `` ?`` where spacing varies.
  Dialers supply them and they run next to live calls, so each must pass
  :func:`check_pattern`: at most :data:`MAX_PATTERN_CHARS` characters; it compiles
  and matches no empty text; no backreferences, conditionals, named groups or global
  inline flags; a repeated group (``*``, ``+``, ``{m,n}`` with n > 1) contains no
  quantifier and no ``|`` (this excludes ``(a+)+`` and ``(a|ab)*``); and the
  product of its quantifiers' sizes (``?`` counts 2, ``{m,n}`` n+1, an unbounded
  ``*``/``+``/``{m,}`` 64) is at most :data:`MAX_REPEAT_PRODUCT` (one ``.*`` and two
  ``?``; two ``.*`` are refused). With the text cap this bounds the backtracking.

:class:`IntentMatcher` turns the stream of partials and the final of an utterance
into at most one report (see its docstring for the stability rule).
:class:`IntentLibrary` holds the node's ``--intents`` and says which rules a call gets
(the worker matches with them; the ingress prompts the LLM fallback with them).
"""

from __future__ import annotations

import json
import re
import tomllib
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = [
    "MAX_INTENTS",
    "MAX_PHRASES",
    "MAX_PATTERNS",
    "MAX_EXAMPLES",
    "MAX_PHRASE_CHARS",
    "MAX_PATTERN_CHARS",
    "MAX_REPEAT_PRODUCT",
    "MAX_TEXT_CHARS",
    "MAX_FILE_BYTES",
    "UNKNOWN",
    "IntentsError",
    "Intent",
    "IntentRules",
    "IntentMatch",
    "IntentMatcher",
    "IntentLibrary",
    "normalize",
    "check_pattern",
]


MAX_INTENTS = 50
MAX_PHRASES = 100  # per intent
MAX_PATTERNS = 10  # per intent
MAX_EXAMPLES = 20  # per intent
MAX_PHRASE_CHARS = 64
MAX_PATTERN_CHARS = 200
MAX_REPEAT_PRODUCT = 256
MAX_TEXT_CHARS = 300  # ~20 s of Korean speech; longer texts are matched on this prefix
MAX_FILE_BYTES = 1 << 20
INTENT_SUFFIXES = (".toml", ".json")
UNKNOWN = "unknown"  # reserved: what the LLM fallback answers when it cannot tell

_UNBOUNDED = 64  # the size an unbounded quantifier counts for in the repeat product
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOP_KEYS = frozenset({"language", "intents"})
_INTENT_KEYS = frozenset({"phrases", "patterns", "examples"})
_PUNCT = re.compile(r"[^\w\s]|_")
_SPACES = re.compile(r"\s+")
_QUANT = re.compile(r"\*|\+|\?|\{(\d*)(,?)(\d*)\}")


class IntentsError(ValueError):
    """An intents file or mapping is malformed; the message names the intent and key."""


def normalize(text: str) -> str:
    """NFC, lowercase, punctuation to spaces, single spaces, at most MAX_TEXT_CHARS."""
    text = unicodedata.normalize("NFC", text[: 4 * MAX_TEXT_CHARS]).lower()
    return _SPACES.sub(" ", _PUNCT.sub(" ", text)).strip()[:MAX_TEXT_CHARS]


def _is_hangul(char: str) -> bool:
    return "\uac00" <= char <= "\ud7a3" or "\u1100" <= char <= "\u11ff" or "\u3130" <= char <= "\u318f"


def _phrase_regex(compact: str) -> str:
    body = " ?".join(re.escape(c) for c in compact)
    if len(compact) == 1 or not all(_is_hangul(c) for c in compact):
        return rf"(?<!\w){body}(?!\w)"
    return body


@dataclass
class _Group:
    quantified: bool = False  # holds a quantifier
    alternation: bool = False  # holds a |


def check_pattern(pattern: str) -> None:
    """Raise IntentsError unless ``pattern`` is safe to run (module docstring, Patterns)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise IntentsError(f"pattern is {len(pattern)} characters, expected no more than {MAX_PATTERN_CHARS}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # "possible nested set": meaning may change
            compiled = re.compile(pattern)
    except (re.error, OverflowError, FutureWarning) as exc:  # OverflowError: a count past sre's limit
        raise IntentsError(f"pattern does not compile: {exc}") from None
    if compiled.fullmatch("") is not None:
        raise IntentsError("pattern matches empty text")
    stack = [_Group()]
    last: _Group | None = None  # the group that just closed, if the last atom is one
    product = 1
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        atom: _Group | None = None
        if char == "\\":
            nxt = pattern[i + 1]
            if nxt in "123456789":
                raise IntentsError(f"pattern has a backreference at character {i}")
            i = pattern.index("}", i) + 1 if nxt == "N" else i + 2
        elif char == "[":
            i += 2 if pattern.startswith("[^", i) else 1
            if pattern[i] == "]":  # a ] right after [ or [^ is a member
                i += 1
            while pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif char == "(":
            if pattern.startswith("(?#", i):
                i = pattern.index(")", i) + 1
                continue
            if pattern.startswith(("(?P=", "(?(", "(?P<"), i):
                raise IntentsError(f"pattern has a named group or a conditional at character {i}")
            i += 1
            if pattern.startswith("?", i):
                i += 1
                if pattern[i] in "=!>:":
                    i += 1
                elif pattern[i] == "<":
                    i += 2
                else:  # flags: (?i:...) is scoped, (?i) would apply to the whole expression
                    while pattern[i] not in ":)":
                        i += 1
                    if pattern[i] == ")":
                        raise IntentsError(f"pattern has global inline flags at character {i}")
                    i += 1
            stack.append(_Group())
            continue
        elif char == ")":
            atom = stack.pop()
            stack[-1].quantified |= atom.quantified
            stack[-1].alternation |= atom.alternation
            i += 1
        elif char == "|":
            stack[-1].alternation = True
            i += 1
            continue
        elif (q := _QUANT.match(pattern, i)) is not None and q[0] != "{}":
            if q[0] == "?":
                size = 2
            elif q[0] in ("*", "+"):
                size = _UNBOUNDED
            else:  # {n}, {m,n}, {,n}, {m,}, {,} as sre_parse reads them
                high = q[3] if q[2] else q[1]
                size = int(high) + 1 if high else _UNBOUNDED
            if size > 2 and last is not None and (last.quantified or last.alternation):
                raise IntentsError(f"pattern repeats a group holding a quantifier or an alternation at character {i}")
            product *= min(size, _UNBOUNDED)
            stack[-1].quantified = True
            i = q.end()
            if pattern.startswith(("?", "+"), i):  # lazy or possessive
                i += 1
        else:
            i += 1
        last = atom
    if product > MAX_REPEAT_PRODUCT:
        raise IntentsError(f"pattern's quantifiers multiply to {product}, expected no more than {MAX_REPEAT_PRODUCT}")


def _strings(value: Any, where: str, cap: int) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise IntentsError(f"{where} is {type(value).__name__}, expected a list of strings")
    if len(value) > cap:
        raise IntentsError(f"{where} has {len(value)} entries, expected no more than {cap}")
    for k, item in enumerate(value):
        if not isinstance(item, str):
            raise IntentsError(f"{where}[{k}] is {type(item).__name__}, expected a string")
    return tuple(value)


@dataclass(frozen=True)
class Intent:
    """One intent: its name, phrases, patterns, and examples (for the LLM prompt).

    Building one validates it and compiles its matcher; raises IntentsError.
    """

    name: str
    phrases: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"intent {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name) or self.name == UNKNOWN:
            raise IntentsError(f"{where}: name must be [a-z][a-z0-9_]* of at most 64 characters, not {UNKNOWN!r}")
        phrases = _strings(self.phrases, f"{where}: phrases", MAX_PHRASES)
        patterns = _strings(self.patterns, f"{where}: patterns", MAX_PATTERNS)
        examples = _strings(self.examples, f"{where}: examples", MAX_EXAMPLES)
        for attr, value in (("phrases", phrases), ("patterns", patterns), ("examples", examples)):
            object.__setattr__(self, attr, value)  # lists from a direct call become tuples
        if not phrases and not patterns:
            raise IntentsError(f"{where} has no phrases and no patterns")
        compacts: set[str] = set()
        for k, phrase in enumerate(phrases):
            if len(phrase) > MAX_PHRASE_CHARS:
                raise IntentsError(
                    f"{where}: phrases[{k}] is {len(phrase)} characters, expected no more than {MAX_PHRASE_CHARS}"
                )
            compact = normalize(phrase).replace(" ", "")
            if not compact:
                raise IntentsError(f"{where}: phrases[{k}] is empty once normalised")
            compacts.add(compact)
        alternatives = [_phrase_regex(c) for c in sorted(compacts, key=lambda c: (-len(c), c))]
        for k, pattern in enumerate(patterns):
            try:
                check_pattern(pattern)
            except IntentsError as exc:
                raise IntentsError(f"{where}: patterns[{k}]: {exc}") from None
            alternatives.append(f"(?i:{unicodedata.normalize('NFC', pattern)})")
        object.__setattr__(self, "regex", re.compile("|".join(alternatives)))

    @property
    def compacts(self) -> frozenset[str]:
        """The phrases as matched: normalised, without spaces."""
        return frozenset(normalize(p).replace(" ", "") for p in self.phrases)


@dataclass(frozen=True)
class IntentMatch:
    """What an utterance meant.

    Attributes:
        name: the intent, or :data:`UNKNOWN` (LLM fallback only).
        matched: the words that matched, as normalised (LLM: the text classified).
        source: ``"rules"`` or ``"llm"``.
        early: reported from a stable partial, before the final.
        also: the other intents that matched, best first.
        revised: the final contradicted an early report; this one replaces it.
        reason: why the answer is :data:`UNKNOWN` (LLM fallback), else ``""``.
    """

    name: str
    matched: str
    source: str = "rules"
    early: bool = False
    also: tuple[str, ...] = ()
    revised: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The members of an ``intent`` event (farm.protocol.events)."""
        out = {"intent": self.name, "matched": self.matched, "source": self.source, "early": self.early}
        out.update(also=list(self.also), revised=self.revised)
        return {**out, "reason": self.reason} if self.reason else out


@dataclass(frozen=True)
class _Hit:
    intent: int  # index in file order
    words: str = field(compare=False)  # as in the normalised text
    compact: str  # the words without spaces
    at: int  # offset in the text without spaces

    @property
    def size(self) -> int:
        return len(self.compact)


def _intent_hits(index: int, intent: Intent, text: str) -> list[_Hit]:
    """Every hit of one intent in a normalised text, left to right."""
    out = []
    for m in intent.regex.finditer(text):
        compact = m[0].replace(" ", "")
        if compact:
            out.append(_Hit(index, m[0].strip(), compact, m.start() - text.count(" ", 0, m.start())))
    return out


@dataclass(frozen=True)
class IntentRules:
    """A campaign's intents in file order; build with :meth:`load` or :meth:`from_mapping`."""

    intents: tuple[Intent, ...]
    language: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "intents", tuple(self.intents))
        if not self.intents:
            raise IntentsError("intents has no intent")
        if len(self.intents) > MAX_INTENTS:
            raise IntentsError(f"intents has {len(self.intents)} intents, expected no more than {MAX_INTENTS}")
        names: set[str] = set()
        owner: dict[str, str] = {}  # phrase as matched -> its intent
        for intent in self.intents:
            if intent.name in names:
                raise IntentsError(f"intent {intent.name!r} is defined twice")
            names.add(intent.name)
            for compact in intent.compacts:
                other = owner.setdefault(compact, intent.name)
                if other != intent.name:
                    raise IntentsError(f"phrase {compact!r} is in intents {other!r} and {intent.name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.intents)

    @classmethod
    def from_mapping(cls, mapping: Any) -> IntentRules:
        """Build from a parsed file or the dialer's JSON object; raises IntentsError."""
        if not isinstance(mapping, Mapping):
            raise IntentsError(f"intents document is {type(mapping).__name__}, expected an object")
        unknown = sorted(set(mapping) - _TOP_KEYS)
        if unknown:
            raise IntentsError(f"unknown key {unknown[0]!r}, expected {sorted(_TOP_KEYS)}")
        language = mapping.get("language", "")
        if not isinstance(language, str):
            raise IntentsError(f"language is {type(language).__name__}, expected a string")
        table = mapping.get("intents")
        if not isinstance(table, Mapping):
            raise IntentsError(f"intents is {type(table).__name__}, expected a table of intents")
        if len(table) > MAX_INTENTS:
            raise IntentsError(f"intents has {len(table)} intents, expected no more than {MAX_INTENTS}")
        intents = []
        for name, body in table.items():
            if not isinstance(body, Mapping):
                raise IntentsError(f"intent {name!r} is {type(body).__name__}, expected a table")
            unknown = sorted(set(body) - _INTENT_KEYS)
            if unknown:
                raise IntentsError(f"intent {name!r}: unknown key {unknown[0]!r}, expected {sorted(_INTENT_KEYS)}")
            intents.append(Intent(name, body.get("phrases", ()), body.get("patterns", ()), body.get("examples", ())))
        return cls(tuple(intents), language)

    @classmethod
    def from_json(cls, raw: str | bytes) -> IntentRules:
        """Build from the JSON object a dialer sends with a call; raises IntentsError."""
        if len(raw) > MAX_FILE_BYTES:
            raise IntentsError(f"intents JSON is {len(raw)} bytes, expected no more than {MAX_FILE_BYTES}")
        try:
            return cls.from_mapping(json.loads(raw))
        except ValueError as exc:
            if isinstance(exc, IntentsError):
                raise
            raise IntentsError(f"intents JSON does not parse: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> IntentRules:
        """Read a ``.toml`` or ``.json`` intents file; raises IntentsError (OSError if unreadable)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".json"):
            raise IntentsError(f"intents file {str(path)!r} has suffix {suffix!r}, expected '.toml' or '.json'")
        raw = path.read_bytes()
        try:
            if suffix == ".json":
                return cls.from_json(raw)
            if len(raw) > MAX_FILE_BYTES:
                raise IntentsError(f"intents file is {len(raw)} bytes, expected no more than {MAX_FILE_BYTES}")
            try:
                return cls.from_mapping(tomllib.loads(raw.decode()))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise IntentsError(f"intents TOML does not parse: {exc}") from None
        except IntentsError as exc:
            raise IntentsError(f"intents file {str(path)!r}: {exc}") from None

    def _hits(self, text: str) -> list[_Hit]:
        """Each matching intent's best hit, best first (module docstring, Priority)."""
        hits = []
        for index, intent in enumerate(self.intents):
            found = _intent_hits(index, intent, text)
            if found:
                hits.append(max(found, key=lambda h: h.size))  # the first of the longest
        hits.sort(key=lambda h: (-h.size, h.intent))
        return hits

    def _report(self, hits: list[_Hit], early: bool = False, revised: bool = False) -> IntentMatch:
        return IntentMatch(
            self.intents[hits[0].intent].name,
            hits[0].words,
            early=early,
            also=tuple(self.intents[h.intent].name for h in hits[1:]),
            revised=revised,
        )

    def match(self, text: str) -> IntentMatch | None:
        """The best intent in ``text`` (one utterance), or None if no rule matches."""
        hits = self._hits(normalize(text))
        return self._report(hits) if hits else None


class IntentMatcher:
    """One call's intent reports, one utterance at a time.

    Call :meth:`on_partial` with each partial text, :meth:`on_final` with the final,
    and :meth:`reset` when an utterance is abandoned without a final (the final ends
    the utterance itself).

    Stability rule: a partial fires early when its best intent is the same as the
    previous partial's and both partials hold the same hit of it: the same words at
    the same place, counted in characters without spaces (Vosk re-spaces earlier
    words as it goes). The worker publishes a partial only when its text changes, so
    this means the words survived one more word of recognition: "네" then "네이버"
    never fires, "네" then "네 맞아요" fires ``yes``. At most one report per utterance,
    except a revision: if the final's best intent differs from the early one, the
    final's is reported with ``revised=True``. A final that matches no rule leaves
    the early report standing (the rules cannot tell "no intent" from words they do
    not list), and so does a final that agrees with it.
    """

    def __init__(self, rules: IntentRules) -> None:
        self.rules = rules
        self._previous: list[_Hit] = []  # every hit of the previous partial's best intent
        self._best = -1  # the previous partial's best intent
        self._fired: IntentMatch | None = None
        # The last final's utterance got no report at all: no rule matched it, none fired
        # early. What the LLM fallback is for.
        self.unmatched = False

    def reset(self) -> None:
        """Forget the utterance; call between utterances that had no final."""
        self._previous, self._best, self._fired = [], -1, None

    def on_partial(self, text: str) -> IntentMatch | None:
        """Report an early match once the partial is stable, at most once per utterance."""
        if self._fired is not None:
            return None
        norm = normalize(text)
        hits = self.rules._hits(norm)
        if not hits:
            self._previous, self._best = [], -1
            return None
        best = hits[0].intent
        current = _intent_hits(best, self.rules.intents[best], norm)
        stable = [h for h in current if h in self._previous] if best == self._best else []
        self._previous, self._best = current, best
        if not stable:
            return None
        report = self.rules._report(hits, early=True)
        self._fired = IntentMatch(report.name, max(stable, key=lambda h: h.size).words, early=True, also=report.also)
        return self._fired

    def on_final(self, text: str) -> IntentMatch | None:
        """Report the final's intent unless an early report already said it; ends the utterance."""
        fired = self._fired
        self.reset()
        hits = self.rules._hits(normalize(text))
        self.unmatched = fired is None and not hits
        if not hits:
            return None
        if fired is None:
            return self.rules._report(hits)
        if self.rules.intents[hits[0].intent].name == fired.name:
            return None
        return self.rules._report(hits, revised=True)


class IntentLibrary:
    """The intent sets of ``--intents``: one file (every call's), or a directory of
    ``NAME.toml``/``NAME.json`` files that calls pick by name (``default`` for calls
    that name none). Loaded once per process that matches or prompts with them (each
    worker; the ingress with the LLM fallback on); ``farm up`` loads it first to refuse
    a bad file."""

    def __init__(self, path: str) -> None:
        self.sets: dict[str, IntentRules] = {}
        self.default: IntentRules | None = None
        if not path:
            return
        where = Path(path)
        if where.is_dir():
            for file in sorted(where.iterdir()):
                if file.suffix in INTENT_SUFFIXES:
                    if file.stem in self.sets:
                        raise IntentsError(f"{file}: a second intent set named {file.stem!r}")
                    self.sets[file.stem] = IntentRules.load(file)
            self.default = self.sets.get("default")
        else:
            self.default = IntentRules.load(where)

    def rules(self, name: str) -> IntentRules:
        try:
            return self.sets[name]
        except KeyError:
            known = ", ".join(sorted(self.sets)) or "none: --intents is not a directory"
            raise IntentsError(f"no intent set named {name[:64]!r} (known: {known})") from None

    def for_call(self, asked: Any) -> IntentRules | None:
        """The rules of a call whose ``intents`` option is ``asked`` (as
        :func:`farm.call_options.call_option` reads it: None when the call said nothing,
        False, a set's name, or inline rules); raises IntentsError or ValueError."""
        if asked is None:
            return self.default
        if isinstance(asked, Mapping):
            # A whole intents file's structure, or just its intents table.
            return IntentRules.from_mapping(asked if "intents" in asked else {"intents": asked})
        if isinstance(asked, str):
            return self.rules(asked)
        if asked is False:
            return None
        raise ValueError(f"must be a set's name, an object or false, got {str(asked)[:40]!r}")
