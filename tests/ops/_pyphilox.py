"""An independent Philox4x32-10 on Python ints (no torch), to check the others against."""
M0, M1, W0, W1, U = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & U, p1 & U, ((p0 >> 32) ^ c3 ^ k1) & U, p0 & U
        k0, k1 = (k0 + W0) & U, (k1 + W1) & U
    return c0, c1, c2, c3


def draw_byte(key, e):
    """Byte e & 15 of counter e >> 4's four little-endian words."""
    return (philox(((e >> 4) & U, (e >> 36) & U, 0, 0), key)[(e >> 2) & 3] >> (8 * (e & 3))) & 0xFF


def keep(key, e, thr):
    """The 24-bit draw B*2^16 + L >= thr, with L (counter (e, 1, 0)) drawn only on a byte tie."""
    b, hi = draw_byte(key, e), thr >> 16
    if b != hi:
        return b > hi
    return (philox((e & U, (e >> 32) & U, 1, 0), key)[0] & 0xFFFF) >= (thr & 0xFFFF)
