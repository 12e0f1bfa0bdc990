"""Redaction: per kind, what it must catch and what it must leave alone."""

import pytest

from p2ptrain.data.redact import KINDS, PLACEHOLDERS, Redactor, luhn_valid, parse_kinds

PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
       "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n-----END RSA PRIVATE KEY-----")
OPENSSH = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
           "-----END OPENSSH PRIVATE KEY-----")

POSITIVES = {
    "email": ["alice@example.com", "bob.smith+tag@mail.co.uk", "x_y-z@sub.domain.io", "Jane.Doe@Uni-Wien.ac.at"],
    "phone": ["+1 415 555 2671", "+44 20 7946 0958", "+49 (30) 1234 5678", "(415) 555-2671", "415-555-2671",
              "415.555.2671", "+33 1 23 45 67 89"],
    "card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5500 0000 0000 0004",
             "3400 000000 00009", "6011000990139424", "378282246310005"],
    "ip": ["192.168.1.10", "10.0.0.1", "8.8.8.8", "255.255.255.255", "2001:db8::1", "fe80::1ff:fe23:4567:890a",
           "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    "secret": [PEM, OPENSSH, "AKIAIOSFODNN7EXAMPLE", "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
               "xoxb-2934857623-aB3dE5fG7hJ9kL", "AIzaSyA1bC2dE3fG4hI5jK6lM7nO8pQ9rS0tU1v",
               "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34",
               "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"],
}

ASSIGNED_SECRETS = [  # (text, the value that must disappear)
    ('api_key = "Zx81kQ2mW9vLr5Tq"', "Zx81kQ2mW9vLr5Tq"),
    ("PASSWORD: hunter2Hunter2!xx", "hunter2Hunter2!xx"),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ('"client_secret": "9f8e7d6c5b4a39281706f5e4"', "9f8e7d6c5b4a39281706f5e4"),
]

NEGATIVES = {
    "email": ["user at example dot com", "@decorator", "a@b", "x = y @ z", "foo@bar.c0m1"],
    "phone": ["2024-01-15", "version 1.2.3", "x = 1234567", "3.14159", "1,234,567", "12:30:45",
              "ticket #4155552671", "id 20240115123045", "ISBN 978-3-16-148410-0"],
    "card": ["4111 1111 1111 1112", "1234567890123456", "0000 0000 0000 0000", "4111 1111 1111",
             "2024-01-15 12:30", "3.141592653589793", "4111 1111-1111 1111"],
    "ip": ["999.1.1.1", "1.2.3", "version 1.2.3.4.5", "std::vector", "dead::beef", "12:30:45", "a::b", "::"],
    "secret": ["api_key = os.environ['API_KEY']", "password = input()", "token = get_token(user)",
               "secret_sauce = 'tomato'", "the password is in the vault", "AKIA123", "sk-short",
               "access_token = self.request_token_value", "-----BEGIN CERTIFICATE-----"],
}


@pytest.mark.parametrize("kind,text", [(k, t) for k, texts in POSITIVES.items() for t in texts])
def test_each_positive_is_replaced_by_its_placeholder(kind, text):
    # Execute
    out, counts = Redactor().redact(f"see {text} here")

    # Assert
    assert text not in out
    assert PLACEHOLDERS[kind] in out
    assert counts[kind] == 1 and sum(counts.values()) == 1


@pytest.mark.parametrize("text,value", ASSIGNED_SECRETS)
def test_secret_values_in_assignments_are_replaced(text, value):
    out, counts = Redactor().redact(text)
    assert value not in out and "[SECRET]" in out and counts["secret"] == 1


@pytest.mark.parametrize("kind,text", [(k, t) for k, texts in NEGATIVES.items() for t in texts])
def test_each_negative_is_left_alone(kind, text):
    # Execute
    out, counts = Redactor().redact(f"see {text} here")

    # Assert
    assert out == f"see {text} here", counts
    assert sum(counts.values()) == 0


def test_only_the_enabled_kinds_are_redacted():
    # Prepare
    text = "mail alice@example.com from 10.0.0.1"

    # Execute
    out, counts = Redactor(kinds=("email",)).redact(text)

    # Assert
    assert out == "mail [EMAIL] from 10.0.0.1" and dict(counts) == {"email": 1}


def test_counts_accumulate_across_texts():
    r = Redactor()
    r("a@example.com b@example.com")
    r("call +1 415 555 2671")
    assert dict(r.counts) == {"email": 2, "phone": 1}


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_kind_specs():
    assert parse_kinds(None) == KINDS and parse_kinds("all") == KINDS
    assert parse_kinds("none") == () and parse_kinds("") == ()
    assert parse_kinds("phone,email") == ("email", "phone")
    with pytest.raises(ValueError, match="unknown redaction kind 'names'"):
        parse_kinds("email,names")
