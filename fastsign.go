//go:build !windows

package hsm

// A signature in two PKCS#11 calls: C_SignInit, then one C_Sign into a
// buffer of the size the key's signatures have. miekg/pkcs11's Sign always
// asks for the length first (a second C_Sign); on a network HSM every call
// is a round trip. Both calls are made in one cgo crossing.
//
// The calls go through the function list of the very module instance
// miekg/pkcs11 loaded and initialized: p11-kit-client.so hands out a new,
// uninitialized instance for every C_GetFunctionList, so a list of our own
// would not share its state. miekg/pkcs11 v1.1.2 keeps it in its unexported
// struct ctx { void *handle; CK_FUNCTION_LIST_PTR sym; }; fastList reads it
// and checks it before use (see below), and falls back to miekg's path when
// any check fails.

/*
#cgo linux LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

typedef unsigned long hsm_ul;
typedef struct { hsm_ul mechanism; void *pParameter; hsm_ul ulParameterLen; } hsm_mech;
typedef hsm_ul (*hsm_init_fn)(hsm_ul session, hsm_mech *m, hsm_ul key);
typedef hsm_ul (*hsm_sign_fn)(hsm_ul session, unsigned char *data, hsm_ul dlen, unsigned char *out, hsm_ul *olen);
typedef struct { unsigned char major, minor; } hsm_version;
// CK_FUNCTION_LIST: the version, then the functions in the order of the
// standard: C_SignInit is the 43rd (index 42), C_Sign the 44th.
typedef struct { hsm_version version; void *fn[44]; } hsm_flist;

enum { IDX_GET_FUNCTION_LIST = 3, IDX_SIGN_INIT = 42, IDX_SIGN = 43 };

// hsm_sign: C_SignInit + C_Sign. *stage says how far it got (0: init).
static hsm_ul hsm_sign(void *fl, hsm_ul session, hsm_ul mechanism, void *param, hsm_ul plen, hsm_ul key,
                       unsigned char *data, hsm_ul dlen, unsigned char *sig, hsm_ul *siglen, int *stage) {
	hsm_flist *f = fl;
	hsm_mech m = { mechanism, param, plen };
	*stage = 0;
	hsm_ul rv = ((hsm_init_fn)f->fn[IDX_SIGN_INIT])(session, &m, key);
	if (rv != 0) return rv;
	*stage = 1;
	return ((hsm_sign_fn)f->fn[IDX_SIGN])(session, data, dlen, sig, siglen);
}

// hsm_sign_again: C_Sign only, after CKR_BUFFER_TOO_SMALL (the operation
// stays active).
static hsm_ul hsm_sign_again(void *fl, hsm_ul session, unsigned char *data, hsm_ul dlen, unsigned char *sig, hsm_ul *siglen) {
	return ((hsm_sign_fn)((hsm_flist *)fl)->fn[IDX_SIGN])(session, data, dlen, sig, siglen);
}

// hsm_check_list validates a function list for the module loaded from path
// with handle: 0 when usable.
static int hsm_check_list(const char *path, void *handle, void *fl) {
	hsm_flist *f = fl;
	if (handle == NULL || f == NULL) return 1;
	// The same loaded object: dlopen of a loaded path returns its handle.
	void *h = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
	if (h == NULL) return 2;
	dlclose(h); // drop the reference RTLD_NOLOAD took
	if (h != handle) return 3;
	if (f->version.major != 2 && f->version.major != 3) return 4;
	if (f->fn[IDX_SIGN_INIT] == NULL || f->fn[IDX_SIGN] == NULL) return 5;
	// Where the module exports the functions, the list must hold them at
	// the indexes used here.
	void *si = dlsym(handle, "C_SignInit"), *s = dlsym(handle, "C_Sign");
	if (si != NULL && s != NULL && (f->fn[IDX_SIGN_INIT] != si || f->fn[IDX_SIGN] != s)) return 6;
	return 0;
}
*/
import "C"

import (
	"unsafe"

	"github.com/miekg/pkcs11"
)

// fastList returns the function list of the module miekg/pkcs11 loaded from
// path, or nil (with the reason) when it cannot be validated.
func fastList(ctx *pkcs11.Ctx, path string) (unsafe.Pointer, int) {
	// *pkcs11.Ctx is a pointer to a struct whose only field is the C ctx.
	cctx := *(*unsafe.Pointer)(unsafe.Pointer(ctx))
	if cctx == nil {
		return nil, 1
	}
	fields := (*[2]unsafe.Pointer)(cctx)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	if rc := C.hsm_check_list(cpath, fields[0], fields[1]); rc != 0 {
		return nil, int(rc)
	}
	return fields[1], 0
}

// fastSign signs on session s with key h: two PKCS#11 calls when size is
// the signature's size.
func fastSign(fl unsafe.Pointer, s pkcs11.SessionHandle, mech *pkcs11.Mechanism, h pkcs11.ObjectHandle, data []byte, size int) ([]byte, error) {
	sig := make([]byte, size)
	n := C.hsm_ul(size)
	var stage C.int
	var param unsafe.Pointer
	if len(mech.Parameter) > 0 {
		param = unsafe.Pointer(&mech.Parameter[0])
	}
	var dp *C.uchar
	if len(data) > 0 {
		dp = (*C.uchar)(unsafe.Pointer(&data[0]))
	}
	rv := C.hsm_sign(fl, C.hsm_ul(s), C.hsm_ul(mech.Mechanism), param, C.hsm_ul(len(mech.Parameter)), C.hsm_ul(h),
		dp, C.hsm_ul(len(data)), (*C.uchar)(unsafe.Pointer(&sig[0])), &n, &stage)
	if rv == pkcs11.CKR_BUFFER_TOO_SMALL && stage == 1 && int(n) > size {
		sig = make([]byte, int(n))
		rv = C.hsm_sign_again(fl, C.hsm_ul(s), dp, C.hsm_ul(len(data)), (*C.uchar)(unsafe.Pointer(&sig[0])), &n)
	}
	if rv != 0 {
		return nil, pkcs11.Error(rv)
	}
	return sig[:int(n)], nil
}
