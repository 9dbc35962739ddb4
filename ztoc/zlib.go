package ztoc

/*
#cgo LDFLAGS: -lz
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

// The z_stream lives in C memory and never keeps Go pointers between
// calls: next_in/next_out are set and cleared inside each call, as cgo's
// pointer rules require.

static z_stream *sp_new(int window_bits, int *ret) {
	z_stream *s = calloc(1, sizeof(z_stream));
	if (s == NULL) { *ret = Z_MEM_ERROR; return NULL; }
	*ret = inflateInit2(s, window_bits);
	if (*ret != Z_OK) { free(s); return NULL; }
	return s;
}

static void sp_free(z_stream *s) {
	inflateEnd(s);
	free(s);
}

static int sp_inflate(z_stream *s, unsigned char *in, unsigned in_len,
		unsigned char *out, unsigned out_len, int flush,
		unsigned *consumed, unsigned *produced, int *data_type) {
	s->next_in = in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	int ret = inflate(s, flush);
	*consumed = in_len - s->avail_in;
	*produced = out_len - s->avail_out;
	*data_type = s->data_type;
	s->next_in = NULL;
	s->next_out = NULL;
	s->avail_in = 0;
	s->avail_out = 0;
	return ret;
}

static int sp_reset(z_stream *s, int window_bits) { return inflateReset2(s, window_bits); }
static int sp_prime(z_stream *s, int bits, int value) { return inflatePrime(s, bits, value); }
static int sp_set_dict(z_stream *s, unsigned char *dict, unsigned len) {
	return inflateSetDictionary(s, dict, len);
}
static const char *sp_msg(z_stream *s) { return s->msg; }
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"
)

// zlib window-bits modes.
const (
	windowBitsGzip = 15 + 16 // gzip wrapper only
	windowBitsRaw  = -15     // raw deflate, used when resuming at a checkpoint
)

// zlib return codes and flush modes used here.
const (
	zOK        = int(C.Z_OK)
	zStreamEnd = int(C.Z_STREAM_END)
	zBufError  = int(C.Z_BUF_ERROR)
	zNoFlush   = int(C.Z_NO_FLUSH)
	zBlock     = int(C.Z_BLOCK)
)

// inflater is a zlib inflate stream. It is not safe for concurrent use.
type inflater struct {
	s *C.z_stream
}

func newInflater(windowBits int) (*inflater, error) {
	var ret C.int
	s := C.sp_new(C.int(windowBits), &ret)
	if s == nil {
		return nil, fmt.Errorf("zlib inflateInit2: code %d", int(ret))
	}
	return &inflater{s: s}, nil
}

// close releases the C stream. It is safe to call more than once.
func (f *inflater) close() {
	if f.s != nil {
		C.sp_free(f.s)
		f.s = nil
	}
}

// inflate runs zlib inflate over in into out and reports how much of each
// was used, zlib's return code and data_type.
func (f *inflater) inflate(in, out []byte, flush int) (consumed, produced int, ret int, dataType int) {
	var c, p C.uint
	var dt C.int
	var inPtr, outPtr *C.uchar
	if len(in) > 0 {
		inPtr = (*C.uchar)(unsafe.Pointer(&in[0]))
	}
	if len(out) > 0 {
		outPtr = (*C.uchar)(unsafe.Pointer(&out[0]))
	}
	r := C.sp_inflate(f.s, inPtr, C.uint(len(in)), outPtr, C.uint(len(out)), C.int(flush), &c, &p, &dt)
	return int(c), int(p), int(r), int(dt)
}

func (f *inflater) reset(windowBits int) error {
	if r := int(C.sp_reset(f.s, C.int(windowBits))); r != zOK {
		return fmt.Errorf("zlib inflateReset2: code %d", r)
	}
	return nil
}

// prime feeds the top bits of a byte that a checkpoint shares with the
// previous block.
func (f *inflater) prime(bits int, value byte) error {
	if bits == 0 {
		return nil
	}
	if r := int(C.sp_prime(f.s, C.int(bits), C.int(int(value)>>(8-bits)))); r != zOK {
		return fmt.Errorf("zlib inflatePrime: code %d", r)
	}
	return nil
}

func (f *inflater) setDictionary(dict []byte) error {
	if len(dict) == 0 {
		return nil
	}
	if r := int(C.sp_set_dict(f.s, (*C.uchar)(unsafe.Pointer(&dict[0])), C.uint(len(dict)))); r != zOK {
		return fmt.Errorf("zlib inflateSetDictionary: code %d", r)
	}
	return nil
}

// errInflate describes a zlib error return, with zlib's message.
func (f *inflater) errInflate(ret int) error {
	msg := ""
	if m := C.sp_msg(f.s); m != nil {
		msg = C.GoString(m)
	}
	switch {
	case msg != "":
		return errors.New(msg)
	case ret == int(C.Z_DATA_ERROR):
		return errors.New("invalid deflate data")
	case ret == int(C.Z_MEM_ERROR):
		return errors.New("out of memory")
	}
	return fmt.Errorf("zlib error %d", ret)
}
