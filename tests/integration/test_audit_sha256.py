"""The pure-Lua SHA-256 / HMAC-SHA256 (``eventstore/sha256.lua``) run by a real Redis agrees
with ``hashlib`` and ``hmac`` on many random inputs."""

from __future__ import annotations

import hashlib
import hmac
import random
from importlib import resources

import pytest
from support.redis_server import RedisServer, admin_client

from eventstore.redis_conn import command

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

PROBE = """
local out = {}
local hkey = hmac_key(ARGV[1])
for i = 2, #ARGV do
  out[#out + 1] = sha256_hex(ARGV[i])
  out[#out + 1] = hmac_hex(hkey, ARGV[i])
end
return out
"""
#: Lengths around the 55/56/64-byte padding boundaries, then random ones.
EDGES = [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 1000]


async def test_lua_sha256_and_hmac_match_python(redis_server: RedisServer) -> None:
    source = resources.files("eventstore").joinpath("sha256.lua").read_text(encoding="utf-8")
    rng = random.Random(20251121)
    admin = admin_client(redis_server.url)
    try:
        for key_length in (0, 1, 16, 32, 63, 64, 65, 200):
            key = rng.randbytes(key_length)
            lengths = EDGES + [rng.randrange(4096) for _ in range(60)]
            messages = [rng.randbytes(n) for n in lengths]
            reply = await command(admin, "EVAL", source + PROBE, 0, key, *messages)
            for i, message in enumerate(messages):
                assert reply[2 * i].decode() == hashlib.sha256(message).hexdigest()
                assert reply[2 * i + 1].decode() == hmac.new(key, message, "sha256").hexdigest()
    finally:
        await admin.aclose()
