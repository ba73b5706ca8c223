"""Reads the character vectors of an R package's lazy-load data base
(data/Rdata.rdx + data/Rdata.rdb), enough for janeaustenr's novels.

The format (R Internals, "Serialization Formats" and "Lazy loading"): the
.rdx index is a gzip'd serialized list whose `variables` element maps each
name to an (offset, length) pair in the .rdb file; each .rdb chunk is a
4-byte big-endian uncompressed length followed by zlib data (or, for
compress types 2 and 3, a type byte then bzip2 / xz data), holding one
object in R's XDR serialization.  Only the object types that such data
files use are read; anything else raises ValueError naming the type.
"""
import bz2
import gzip
import lzma
import struct
import zlib

NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, REFSXP = 254, 253, 242, 241, 251, 255
BASENAMESPACE, UNBOUNDVALUE = 247, 252
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
ALTREP = 238


class _Reader:
    def __init__(self, data, where):
        self.d, self.p, self.where, self.refs = data, 0, where, []

    def _take(self, n):
        if self.p + n > len(self.d):
            raise ValueError("%s: truncated at byte %d" % (self.where, self.p))
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def i32(self):
        return struct.unpack(">i", self._take(4))[0]

    def header(self):
        if self._take(2) != b"X\n":
            raise ValueError("%s: not an XDR serialization" % self.where)
        version = self.i32()
        self.i32(), self.i32()
        if version == 3:
            self._take(self.i32())

    def item(self):
        flags = self.i32()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, BASENAMESPACE, UNBOUNDVALUE):
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.i32()
            return self.refs[idx - 1]
        if t == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t == CHARSXP:
            n = self.i32()
            return None if n == -1 else self._take(n).decode("utf-8", "replace")
        if t == LISTSXP:
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            out = [(tag, car)]
            if isinstance(cdr, _Pairs):
                out += cdr
            return _Pairs(out)
        if t == ALTREP:
            self.item()
            state = self.item()
            self.item()
            return state
        if t in (LGLSXP, INTSXP):
            n = self.i32()
            v = list(struct.unpack(">%di" % n, self._take(4 * n)))
        elif t == REALSXP:
            n = self.i32()
            v = list(struct.unpack(">%dd" % n, self._take(8 * n)))
        elif t in (STRSXP, VECSXP):
            v = [self.item() for _ in range(self.i32())]
        else:
            raise ValueError("%s: R object type %d at byte %d is not supported" % (self.where, t, self.p))
        if has_attr:
            attrs = self.item()
            names = dict(attrs).get("names") if isinstance(attrs, _Pairs) else None
            if names is not None and len(names) == len(v):
                return _Named(zip(names, v))
        return v


class _Pairs(list):
    pass


class _Named(list):
    """A vector with a names attribute: a list of (name, value) pairs."""


def unserialize(data, where):
    r = _Reader(data, where)
    r.header()
    return r.item()


def read_lazyload(prefix):
    """Returns {name: object} for every variable in PREFIX.rdx / PREFIX.rdb."""
    with gzip.open(prefix + ".rdx") as f:
        index = unserialize(f.read(), prefix + ".rdx")
    fields = dict(index)
    if "variables" not in fields:
        raise ValueError("%s.rdx: no 'variables' element" % prefix)
    with open(prefix + ".rdb", "rb") as f:
        rdb = f.read()
    out = {}
    for name, (off, length) in fields["variables"]:
        off, length = int(off), int(length)
        chunk = rdb[off:off + length]
        if len(chunk) != length or length < 5:
            raise ValueError("%s.rdb: variable %s lies outside the file" % (prefix, name))
        kind = chunk[4]
        if kind == ord("2"):
            raw = bz2.decompress(chunk[5:])
        elif kind == ord("Z"):
            raw = lzma.decompress(chunk[5:])
        elif kind == ord("0"):
            raw = chunk[5:]
        else:
            raw = zlib.decompress(chunk[4:])
        out[name] = unserialize(raw, "%s.rdb:%s" % (prefix, name))
    return out


if __name__ == "__main__":
    import sys
    for k, v in read_lazyload(sys.argv[1]).items():
        print(k, type(v).__name__, len(v) if hasattr(v, "__len__") else v)
