"""Redaction of personal data and secrets, applied to a document's text before it is tokenized.

Kinds (all on by default; a source may keep fewer):

- ``secret``: PEM/OpenSSH/PGP private-key blocks, well-known API token formats (AWS, GitHub,
  GitLab, Slack, Google, Stripe, OpenAI/Anthropic-style ``sk-…``, Hugging Face, JWTs) and
  the value of ``api_key = …`` / ``password: …``-style assignments when it looks random
- ``email``: e-mail addresses
- ``card``: payment-card numbers (13-19 digits, a known issuer prefix and a valid Luhn sum)
- ``ip``: IPv4 and IPv6 addresses (validated by the standard library's ``ipaddress``)
- ``phone``: phone numbers written as phone numbers: an international ``+CC`` prefix, an
  area code in parentheses, or the 3-3-4 digit grouping; bare digit runs are left alone
  (they are far more often ids, counts or timestamps than phone numbers)

Each match is replaced by a placeholder such as ``[EMAIL]``; the counts per kind are what
the ledger and ``p2ptrain data list`` report. Well-kept detectors were considered: Presidio
needs a spaCy model downloaded at run time, and detect-secrets covers secrets only (not
personal data) through a file-scanning API with process-wide settings; so these are
patterns, each with tests of what it must and must not catch (tests/unit/test_redact.py).
Patterns miss what they do not describe (a phone number written as plain digits, a
password in prose): redaction lowers the risk of memorising such strings, it is no
guarantee, and README says so.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

KINDS = ("secret", "email", "card", "ip", "phone")
PLACEHOLDERS = {"secret": "[SECRET]", "email": "[EMAIL]", "card": "[CARD]", "ip": "[IP]", "phone": "[PHONE]"}

# ------------------------------------------------------------------ secrets

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL)
_TOKEN_FORMATS = re.compile(r"""(?<![A-Za-z0-9_\-])(?:
      (?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}                 # AWS access key id
    | gh[pousr]_[A-Za-z0-9]{36,255}                        # GitHub tokens
    | github_pat_[A-Za-z0-9_]{22,255}
    | glpat-[A-Za-z0-9_\-]{20,}                            # GitLab
    | xox[abposr]-[A-Za-z0-9\-]{10,}                       # Slack
    | AIza[0-9A-Za-z_\-]{35}                               # Google API key
    | (?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}          # Stripe
    | sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_\-]{20,}   # OpenAI / Anthropic style
    | hf_[A-Za-z0-9]{30,}                                  # Hugging Face
    | eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}   # JWT
    )(?![A-Za-z0-9_\-])""", re.VERBOSE)
_ASSIGNED_SECRET = re.compile(
    r"""(?ix)
    (?:api[_\-]?key|apikey|secret(?:[_\-]?key)?|access[_\-]?key|auth[_\-]?token|access[_\-]?token|token|
       password|passwd|pwd|client[_\-]?secret|private[_\-]?key)
    ["']?\s*(?::|=|:=|=>)\s*["']?
    (?P<value>[A-Za-z0-9_\-+/=.~!@#$%^&*]{12,})""")


def _looks_random(value: str) -> bool:
    """A value worth hiding: mixed character classes or high entropy, not an identifier."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z_.]*", value) and "_" in value or "." in value and value.count(".") > 2:
        return False  # snake_case names and dotted paths: code, not secrets
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]"))
    counts = Counter(value)
    entropy = -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())
    return classes >= 3 or (classes >= 2 and entropy >= 3.5)


# ------------------------------------------------------------ personal data

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![A-Za-z0-9\-])")
_CARD = re.compile(r"(?<![\d.\-])\d(?:[ \-]?\d){12,18}(?![\d\-]|\.\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%[A-Za-z0-9]+)?(?![0-9A-Fa-f:])")
_PHONE = re.compile(r"""(?x)(?<![\w+\-.])(?:
      \+\d{1,3}[\s.\-]?(?:\(\d{1,4}\)[\s.\-]?)?\d{1,4}(?:[\s.\-]?\d{2,4}){2,4}   # +CC ...
    | \(\d{2,4}\)[\s.\-]?\d{3,4}[\s.\-]\d{3,4}                                # (555) 123-4567
    | \d{3}[\-.\s]\d{3}[\-.\s]\d{4}                                           # 555-123-4567
    )(?![\w\-]|\.\d)""")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_issuer(digits: str) -> bool:
    n = len(digits)
    two, four = int(digits[:2]), int(digits[:4])
    return ((digits[0] == "4" and n in (13, 16, 19))                     # Visa
            or (51 <= two <= 55 or 2221 <= four <= 2720) and n == 16     # Mastercard
            or two in (34, 37) and n == 15                               # American Express
            or (digits.startswith("6011") or two == 65 or 644 <= int(digits[:3]) <= 649) and n in (16, 19)
            or two == 35 and 16 <= n <= 19                               # JCB
            or (two in (36, 38, 39) or 300 <= int(digits[:3]) <= 305) and 14 <= n <= 19  # Diners
            or two == 62 and 16 <= n <= 19)                              # UnionPay


def _is_card(match: str) -> bool:
    digits = re.sub(r"[ \-]", "", match)
    seps = set(re.findall(r"[ \-]", match))
    return 13 <= len(digits) <= 19 and len(seps) <= 1 and _card_issuer(digits) and luhn_valid(digits)


def _is_ipv4(match: str) -> bool:
    try:
        ipaddress.IPv4Address(match)
        return True
    except ValueError:
        return False


def _is_ipv6(match: str) -> bool:
    address = match.split("%", 1)[0]
    groups = [g for g in address.split(":") if g]
    if len(groups) < 2 or not any(ch.isdigit() for ch in address):
        return False  # "::", "a::b" or "dead::beef": more often code than an address
    try:
        ipaddress.IPv6Address(address)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------ driver

@dataclass
class Redactor:
    """Replaces every enabled kind by its placeholder and counts what it replaced."""

    kinds: tuple[str, ...] = KINDS
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")

    def __call__(self, text: str) -> str:
        return self.redact(text)[0]

    def redact(self, text: str) -> tuple[str, Counter]:
        """(redacted text, counts per kind for this text); also adds the counts to self.counts."""
        found: Counter = Counter()
        for kind in KINDS:  # fixed order: secrets before e-mails (a key may contain '@'), IPs before phones
            if kind in self.kinds:
                text = _STEPS[kind](text, found)
        self.counts.update(found)
        return text, found


def _sub(pattern: re.Pattern, kind: str, check: Callable[[str], bool] | None = None):
    placeholder = PLACEHOLDERS[kind]

    def step(text: str, found: Counter) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            found[kind] += 1
            return placeholder
        return pattern.sub(repl, text)
    return step


def _secrets(text: str, found: Counter) -> str:
    text = _sub(_PRIVATE_KEY, "secret")(text, found)
    text = _sub(_TOKEN_FORMATS, "secret")(text, found)

    def repl(m: re.Match) -> str:
        value = m.group("value")
        if not _looks_random(value):
            return m.group(0)
        found["secret"] += 1
        start = m.start("value") - m.start(0)
        return m.group(0)[:start] + PLACEHOLDERS["secret"] + m.group(0)[start + len(value):]
    return _ASSIGNED_SECRET.sub(repl, text)


def _ips(text: str, found: Counter) -> str:
    text = _sub(_IPV4, "ip", _is_ipv4)(text, found)
    return _sub(_IPV6, "ip", _is_ipv6)(text, found)


_STEPS = {
    "secret": _secrets,
    "email": _sub(_EMAIL, "email"),
    "card": _sub(_CARD, "card", _is_card),
    "ip": _ips,
    "phone": _sub(_PHONE, "phone"),
}


def parse_kinds(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """'all' / None → every kind; 'none' / '' → no redaction; 'email,phone' → those kinds."""
    if spec is None:
        return KINDS
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items in ([], ["none"]):
        return ()
    if items == ["all"]:
        return KINDS
    unknown = [s for s in items if s not in KINDS]
    if unknown:
        raise ValueError(f"unknown redaction kind {unknown[0]!r}; use all, none or a list of: {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in items)
