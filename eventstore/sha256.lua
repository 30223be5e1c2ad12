-- flowlog: SHA-256 and HMAC-SHA256 in pure Lua 5.1 with LuaBitOp (the `bit` library of Redis'
-- Lua; Redis 7.0 offers sha1hex only). Included in front of scripts that need it.
--
-- hmac_key(key)        -> the key's inner and outer midstates (compute once per call)
-- hmac_hex(hkey, msg)  -> lowercase hex HMAC-SHA256 of msg
-- sha256_hex(msg)      -> lowercase hex SHA-256 of msg
--
-- Words are LuaBitOp's signed 32-bit numbers; sums are wrapped with bit.tobit.

local band, bor, bxor = bit.band, bit.bor, bit.bxor
local rshift, lshift, ror, tobit, tohex = bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local sbyte, schar, srep, floor = string.byte, string.char, string.rep, math.floor

local K256 = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
for i = 1, 64 do
  K256[i] = tobit(K256[i])
end

local H256 = {
  tobit(0x6a09e667), tobit(0xbb67ae85), tobit(0x3c6ef372), tobit(0xa54ff53a),
  tobit(0x510e527f), tobit(0x9b05688c), tobit(0x1f83d9ab), tobit(0x5be0cd19),
}

local W256 = {}

-- Compress the 64-byte block of `s` starting after `offset` into the state `H` (in place).
local function sha256_block(H, s, offset)
  local W = W256
  for j = 1, 16 do
    local a, b, c, d = sbyte(s, offset + j * 4 - 3, offset + j * 4)
    W[j] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
  end
  for j = 17, 64 do
    local w15, w2 = W[j - 15], W[j - 2]
    local s0 = bxor(ror(w15, 7), ror(w15, 18), rshift(w15, 3))
    local s1 = bxor(ror(w2, 17), ror(w2, 19), rshift(w2, 10))
    W[j] = tobit(W[j - 16] + s0 + W[j - 7] + s1)
  end
  local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
  -- ch(e, f, g) = g ^ (e & (f ^ g)); maj(a, b, c) = b ^ ((a ^ b) & (b ^ c)), where b ^ c is
  -- the previous round's a ^ b (fewer calls: the cost here is one C call per bit operation).
  local bc = bxor(b, c)
  for j = 1, 64 do
    local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(g, band(e, bxor(f, g)))
      + K256[j] + W[j]
    local ab = bxor(a, b)
    local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(b, band(ab, bc))
    bc = ab
    h, g, f, e = g, f, e, tobit(d + t1)
    d, c, b, a = c, b, a, tobit(t1 + t2)
  end
  H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
  H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
end

local function be32(x)
  return schar(band(rshift(x, 24), 255), band(rshift(x, 16), 255), band(rshift(x, 8), 255),
    band(x, 255))
end

-- The final state of SHA-256 over (`done` bytes already in `state`) followed by `msg`.
local function sha256_finish(state, done, msg)
  local H = { state[1], state[2], state[3], state[4], state[5], state[6], state[7], state[8] }
  local bits = (done + #msg) * 8
  local padded = msg .. '\128' .. srep('\0', (55 - #msg) % 64)
    .. be32(floor(bits / 4294967296)) .. be32(bits % 4294967296)
  for offset = 0, #padded - 64, 64 do
    sha256_block(H, padded, offset)
  end
  return H
end

local function state_bytes(H)
  local out = {}
  for i = 1, 8 do
    out[i] = be32(H[i])
  end
  return table.concat(out)
end

local function state_hex(H)
  local out = {}
  for i = 1, 8 do
    out[i] = tohex(H[i], 8)
  end
  return table.concat(out)
end

local function sha256_hex(msg)
  return state_hex(sha256_finish(H256, 0, msg))
end

local function hmac_key(key)
  if #key > 64 then
    key = state_bytes(sha256_finish(H256, 0, key))
  end
  key = key .. srep('\0', 64 - #key)
  local inner, outer = {}, {}
  for i = 1, 64 do
    local byte = sbyte(key, i)
    inner[i] = schar(bxor(byte, 0x36))
    outer[i] = schar(bxor(byte, 0x5c))
  end
  local hkey = { inner = { unpack(H256) }, outer = { unpack(H256) } }
  sha256_block(hkey.inner, table.concat(inner), 0)
  sha256_block(hkey.outer, table.concat(outer), 0)
  return hkey
end

local function hmac_hex(hkey, msg)
  return state_hex(sha256_finish(hkey.outer, 64, state_bytes(sha256_finish(hkey.inner, 64, msg))))
end
