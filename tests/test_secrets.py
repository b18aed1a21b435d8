"""Secrets: salted hashes, the master key file, AES-GCM, and HS256 JWTs (PyJWT)."""

import base64
import json
import os
import stat

import jwt
import pytest
from cryptography.exceptions import InvalidTag

from gatewayd.core.devices.secrets import (
    JWTError,
    JWTVerifier,
    Keyring,
    decode_jwt,
    encode_jwt,
    hash_secret,
    load_master_key,
    new_secret,
    verify_secret,
)


def test_hash_verifies_only_the_right_secret():
    secret = new_secret()
    stored = hash_secret(secret)
    assert stored.startswith("pbkdf2_sha256$") and secret not in stored
    assert verify_secret(secret, stored)
    assert not verify_secret(secret + "x", stored)
    assert not verify_secret("", stored)


def test_new_secrets_never_start_with_a_dash():
    # One in 64 token_urlsafe draws starts with '-': 2,000 draws meet ~31 of them.
    drawn = [new_secret() for _ in range(2000)]
    assert not any(s.startswith("-") for s in drawn)
    assert len(set(drawn)) == len(drawn) and all(len(s) == 32 for s in drawn)


def test_same_secret_hashes_differently_each_time():
    assert hash_secret("same") != hash_secret("same")


@pytest.mark.parametrize("stored", ["", "garbage", "pbkdf2_sha256$x$y$z", "md5$1$AA==$AA==", "pbkdf2_sha256$10$!!$AA=="])
def test_malformed_hash_never_verifies(stored):
    assert verify_secret("anything", stored) is False


def test_master_key_file_is_created_once_with_0600(tmp_path):
    key = load_master_key(tmp_path, "")
    path = tmp_path / "master.key"
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key(tmp_path, "") == key


def test_master_key_from_env_wins(tmp_path, monkeypatch):
    key = os.urandom(32)
    monkeypatch.setenv("TEST_MASTER", base64.b64encode(key).decode())
    assert load_master_key(tmp_path, "TEST_MASTER") == key
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_bad_master_key_env_is_refused(tmp_path, monkeypatch, value):
    monkeypatch.setenv("TEST_MASTER", value)
    with pytest.raises(ValueError, match="TEST_MASTER"):
        load_master_key(tmp_path, "TEST_MASTER")


def test_encryption_is_bound_to_its_context():
    ring = Keyring(os.urandom(32))
    blob = ring.encrypt("signing-secret", "fam/dev1")
    assert b"signing-secret" not in blob
    assert ring.decrypt(blob, "fam/dev1") == "signing-secret"
    with pytest.raises(InvalidTag):
        ring.decrypt(blob, "fam/dev2")
    with pytest.raises(InvalidTag):
        Keyring(os.urandom(32)).decrypt(blob, "fam/dev1")


def test_lookup_digest_is_keyed():
    master = os.urandom(32)
    assert Keyring(master).lookup("k") == Keyring(master).lookup("k")
    assert Keyring(master).lookup("k") != Keyring(os.urandom(32)).lookup("k")


def test_jwt_round_trip_and_expiry():
    key = os.urandom(32)
    token = encode_jwt({"sub": "d1", "exp": 1000}, key)
    assert decode_jwt(token, key, now=999)["sub"] == "d1"
    with pytest.raises(JWTError) as info:
        decode_jwt(token, key, now=1001)
    assert info.value.expired


def test_jwt_verifier_checks_a_token_once_and_its_expiry_every_time(monkeypatch):
    key = os.urandom(32)
    verifier = JWTVerifier(key)
    token = encode_jwt({"sub": "d1", "exp": 1000}, key)
    checks = []
    real = jwt.PyJWS.decode
    monkeypatch.setattr(jwt.PyJWS, "decode", lambda self, *a, **kw: checks.append(1) or real(self, *a, **kw))
    assert verifier.decode(token, now=10)["sub"] == "d1"
    verifier.decode(token, now=11)["sub"] = "changed"  # the caller's copy
    assert verifier.decode(token, now=12)["sub"] == "d1"
    assert len(checks) == 1  # the signature once
    with pytest.raises(JWTError) as info:
        verifier.decode(token, now=1001)
    assert info.value.expired
    # A forged token (another subject, the remembered token's signature) is checked, and refused.
    header, _, signature = token.split(".")
    with pytest.raises(JWTError, match="signature"):
        verifier.decode(f"{header}.{_b64url({'sub': 'd2', 'exp': 1000})}.{signature}", now=10)
    with pytest.raises(JWTError, match="signature"):
        JWTVerifier(os.urandom(32)).decode(token, now=10)  # another key: not its memory


def _b64url(doc):
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()


def test_jwt_tampering_is_detected():
    key = os.urandom(32)
    header, _, signature = encode_jwt({"sub": "d1", "exp": 1000}, key).split(".")
    forged = f"{header}.{_b64url({'sub': 'd2', 'exp': 1000})}.{signature}"
    with pytest.raises(JWTError, match="signature"):
        decode_jwt(forged, key, now=0)
    with pytest.raises(JWTError, match="signature"):
        decode_jwt(encode_jwt({"sub": "d1", "exp": 1000}, os.urandom(32)), key, now=0)


@pytest.mark.parametrize("token", [
    "", "a.b", "a.b.c.d", f"{_b64url({'alg': 'none'})}.{_b64url({'sub': 'x', 'exp': 9e9})}.",
    f"{_b64url({'alg': 'HS256'})}.@@@.xx",
])
def test_malformed_or_unsigned_jwts_are_refused(token):
    with pytest.raises(JWTError):
        decode_jwt(token, os.urandom(32), now=0)


def test_jwt_without_expiry_is_refused():
    key = os.urandom(32)
    with pytest.raises(JWTError, match="expiry"):
        decode_jwt(encode_jwt({"sub": "d1"}, key), key, now=0)


# Issued by the hand-written encoder this codec replaced (same key derivation, same
# claims as `Authenticator.issue_jwt`): tokens held by devices must still verify, and a
# token is the same string whichever version issued it.
GOLDEN_MASTER = bytes(range(32))
GOLDEN_CLAIMS = {"sub": "SL001", "fam": "streetlight", "ep": 0, "iat": 1700000000, "exp": 1700604800}
GOLDEN_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJlcCI6MCwiZXhwIjoxNzAwNjA0ODAwLCJmYW0iOiJzdHJlZXRsaWdodCIsImlhdCI6MTcwMDAwMDAwMCwic3ViIjoiU0wwMDEifQ"
    ".D4780PCDXXZGtqp8H3ZGjvIi2nBejb4l5YHtf8ALIC8"
)


def test_tokens_issued_before_pyjwt_still_verify_and_encode_identically():
    key = Keyring(GOLDEN_MASTER).jwt_key
    assert decode_jwt(GOLDEN_TOKEN, key, now=1700000000) == GOLDEN_CLAIMS
    assert encode_jwt(GOLDEN_CLAIMS, key) == GOLDEN_TOKEN
    # Key order of the claims does not change the token: they are serialized sorted.
    assert encode_jwt(dict(reversed(GOLDEN_CLAIMS.items())), key) == GOLDEN_TOKEN


def test_jwt_expiry_is_inclusive_and_leeway_extends_it():
    key = os.urandom(32)
    token = encode_jwt({"sub": "d1", "exp": 1000}, key)
    assert decode_jwt(token, key, now=1000)["sub"] == "d1"  # valid up to and including exp
    assert decode_jwt(token, key, now=1005, leeway_s=5)["sub"] == "d1"
    with pytest.raises(JWTError, match="expired"):
        decode_jwt(token, key, now=1005.5, leeway_s=5)
    # Fractional expiries are read as they are (PyJWT's own claim check would truncate).
    assert decode_jwt(encode_jwt({"exp": 1000.5}, key), key, now=1000.25)["exp"] == 1000.5


def test_jwt_time_is_the_callers_clock_not_the_wall_clock():
    """iat/nbf in the future and an exp long past by the wall clock: only `now` counts."""
    key = os.urandom(32)
    token = encode_jwt({"sub": "d1", "iat": 4e9, "nbf": 4e9, "exp": 100}, key)
    assert decode_jwt(token, key, now=50)["sub"] == "d1"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "none"])
def test_only_hs256_is_accepted(alg):
    key = os.urandom(64)
    token = jwt.encode({"sub": "d1", "exp": 9e9}, key if alg != "none" else None, algorithm=alg)
    with pytest.raises(JWTError, match="only HS256"):
        decode_jwt(token, key, now=0)
    # An HS256 signature under a header that names another alg is refused as well.
    header, payload, signature = encode_jwt({"sub": "d1", "exp": 9e9}, key).split(".")
    with pytest.raises(JWTError, match="only HS256|signature"):
        decode_jwt(f"{_b64url({'alg': alg, 'typ': 'JWT'})}.{payload}.{signature}", key, now=0)


@pytest.mark.parametrize("header", [
    b"[" * 1000 + b"]" * 1000,  # RecursionError in a naive parser
    b'{"alg": "HS256", "crit": ["exp"]}',
    b'{"alg": "HS256", "kid": 7}',
    b'"HS256"',
])
def test_hostile_headers_are_malformed_not_crashes(header):
    key = os.urandom(32)
    encoded = base64.urlsafe_b64encode(header).rstrip(b"=").decode()
    with pytest.raises(JWTError, match="malformed|only HS256"):
        decode_jwt(f"{encoded}.e30.c2ln", key, now=0)


def test_signed_but_hostile_payloads_are_malformed():
    key = os.urandom(32)
    for payload in (b"[" * 1000 + b"]" * 1000, b"[1]", b"\xff", b"NaN"):
        token = jwt.api_jws.encode(payload, key, algorithm="HS256")
        with pytest.raises(JWTError, match="malformed JWT payload|without expiry"):
            decode_jwt(token, key, now=0)


@pytest.mark.parametrize("mangle", [
    lambda t: t + "!!!!",                   # junk outside the base64url alphabet
    lambda t: t.replace(".", ".\u00e9", 1),  # non-ASCII
    lambda t: t[:-1] + chr(ord(t[-1]) + 1),  # the signature's unused low bits set
])
def test_non_canonical_tokens_are_refused(mangle):
    key = os.urandom(32)
    with pytest.raises(JWTError):
        decode_jwt(mangle(encode_jwt({"sub": "d1", "exp": 9e9}, key)), key, now=0)
