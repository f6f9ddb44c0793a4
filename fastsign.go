//go:build !windows

package hsm

// A signature or a decryption in two PKCS#11 calls: C_SignInit (or
// C_DecryptInit), then one C_Sign (C_Decrypt) into a buffer of the size the
// key's output has. miekg/pkcs11's Sign and Decrypt always ask for the length
// first (a second C_Sign or C_Decrypt); on a network HSM every call is a
// round trip. Both calls are made in one cgo crossing.
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
// CK_RSA_PKCS_OAEP_PARAMS (not packed: this file is not built on Windows).
typedef struct { hsm_ul hashAlg, mgf, source; void *pSourceData; hsm_ul ulSourceDataLen; } hsm_oaep;
// C_SignInit and C_DecryptInit have the same signature, and so have C_Sign
// and C_Decrypt.
typedef hsm_ul (*hsm_init_fn)(hsm_ul session, hsm_mech *m, hsm_ul key);
typedef hsm_ul (*hsm_op_fn)(hsm_ul session, unsigned char *in, hsm_ul inlen, unsigned char *out, hsm_ul *outlen);
typedef struct { unsigned char major, minor; } hsm_version;
// CK_FUNCTION_LIST: the version, then the functions in the order of the
// standard: C_DecryptInit is the 34th (index 33), C_Decrypt the 35th,
// C_SignInit the 43rd, C_Sign the 44th.
typedef struct { hsm_version version; void *fn[44]; } hsm_flist;

enum { IDX_GET_ATTRIBUTE_VALUE = 24, IDX_DECRYPT_INIT = 33, IDX_DECRYPT = 34, IDX_SIGN_INIT = 42, IDX_SIGN = 43 };

// CK_ATTRIBUTE, and C_GetAttributeValue.
typedef struct { hsm_ul type; void *pValue; hsm_ul ulValueLen; } hsm_attr;
typedef hsm_ul (*hsm_getattr_fn)(hsm_ul session, hsm_ul obj, hsm_attr *t, hsm_ul n);

// hsm_get_attrs reads the n attributes of obj whose types are in types,
// in one C_GetAttributeValue, each into its own slot of size bytes of
// buf; lens gets each length (CK_UNAVAILABLE_INFORMATION when the
// attribute is absent, sensitive or longer than the slot).
static hsm_ul hsm_get_attrs(void *fl, hsm_ul session, hsm_ul obj, hsm_ul *types, hsm_ul n,
                            unsigned char *buf, hsm_ul size, hsm_ul *lens) {
	hsm_attr t[32];
	if (n > 32) return 0x7; // CKR_ARGUMENTS_BAD
	for (hsm_ul i = 0; i < n; i++) {
		t[i].type = types[i];
		t[i].pValue = buf + i * size;
		t[i].ulValueLen = size;
	}
	hsm_ul rv = ((hsm_getattr_fn)((hsm_flist *)fl)->fn[IDX_GET_ATTRIBUTE_VALUE])(session, obj, t, n);
	for (hsm_ul i = 0; i < n; i++) lens[i] = t[i].ulValueLen;
	return rv;
}

// hsm_run: the init function at index init, then the single-part
// operation after it. *stage says how far it got (0: init).
static hsm_ul hsm_run(hsm_flist *f, int init, hsm_ul session, hsm_mech *m, hsm_ul key,
                      unsigned char *in, hsm_ul inlen, unsigned char *out, hsm_ul *outlen, int *stage) {
	*stage = 0;
	hsm_ul rv = ((hsm_init_fn)f->fn[init])(session, m, key);
	if (rv != 0) return rv;
	*stage = 1;
	return ((hsm_op_fn)f->fn[init + 1])(session, in, inlen, out, outlen);
}

// hsm_sign: C_SignInit + C_Sign; param is a flat parameter (PSS) or NULL.
static hsm_ul hsm_sign(void *fl, hsm_ul session, hsm_ul mechanism, void *param, hsm_ul plen, hsm_ul key,
                       unsigned char *data, hsm_ul dlen, unsigned char *sig, hsm_ul *siglen, int *stage) {
	hsm_mech m = { mechanism, param, plen };
	return hsm_run(fl, IDX_SIGN_INIT, session, &m, key, data, dlen, sig, siglen, stage);
}

// hsm_decrypt: C_DecryptInit + C_Decrypt; with oaep set, the mechanism
// takes CK_RSA_PKCS_OAEP_PARAMS built here from the other arguments (the
// label stays in the caller's memory for the duration of the call).
static hsm_ul hsm_decrypt(void *fl, hsm_ul session, hsm_ul mechanism, int oaep, hsm_ul hash, hsm_ul mgf, hsm_ul source,
                          void *label, hsm_ul llen, hsm_ul key,
                          unsigned char *ct, hsm_ul ctlen, unsigned char *out, hsm_ul *outlen, int *stage) {
	hsm_oaep p = { hash, mgf, source, label, llen };
	hsm_mech m = { mechanism, oaep ? &p : NULL, oaep ? sizeof p : 0 };
	return hsm_run(fl, IDX_DECRYPT_INIT, session, &m, key, ct, ctlen, out, outlen, stage);
}

// hsm_again: the single-part operation (index op) only, after
// CKR_BUFFER_TOO_SMALL, which leaves the operation active.
static hsm_ul hsm_again(void *fl, int op, hsm_ul session, unsigned char *in, hsm_ul inlen, unsigned char *out, hsm_ul *outlen) {
	return ((hsm_op_fn)((hsm_flist *)fl)->fn[op])(session, in, inlen, out, outlen);
}

// hsm_check_fn: 0 when the list holds name at idx, or the module does not
// export name (a module may export only C_GetFunctionList).
static int hsm_check_fn(void *handle, hsm_flist *f, int idx, const char *name) {
	if (f->fn[idx] == NULL) return 1;
	void *sym = dlsym(handle, name);
	return sym != NULL && sym != f->fn[idx];
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
	// Where the module exports the functions, the list must hold them at
	// the indexes used here.
	if (hsm_check_fn(handle, f, IDX_SIGN_INIT, "C_SignInit") || hsm_check_fn(handle, f, IDX_SIGN, "C_Sign")) return 5;
	if (hsm_check_fn(handle, f, IDX_DECRYPT_INIT, "C_DecryptInit") || hsm_check_fn(handle, f, IDX_DECRYPT, "C_Decrypt")) return 6;
	if (hsm_check_fn(handle, f, IDX_GET_ATTRIBUTE_VALUE, "C_GetAttributeValue")) return 7;
	return 0;
}
*/
import "C"

import (
	"fmt"
	"reflect"
	"runtime/debug"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// fastList returns the function list of the module miekg/pkcs11 loaded from
// path, or nil with the reason why it cannot be used. It reads miekg's
// unexported structures only when the build links exactly the version whose
// layout was validated (under minimal version selection a program may link
// a newer one), and checks what it reads before use.
func fastList(ctx *pkcs11.Ctx, path string) (unsafe.Pointer, string) {
	if v := linkedMiekg(); v != miekgValidated && v != "" {
		return nil, fmt.Sprintf("github.com/miekg/pkcs11 %s is linked; the two-call path reads the layout of %s only", v, miekgValidated)
	}
	// *pkcs11.Ctx is a pointer to a struct whose only field is a pointer
	// to the C struct ctx { void *handle; CK_FUNCTION_LIST_PTR sym; }.
	if t := reflect.TypeFor[pkcs11.Ctx](); t.NumField() != 1 || t.Field(0).Type.Kind() != reflect.Pointer {
		return nil, "pkcs11.Ctx is not a struct of one pointer"
	}
	cctx := *(*unsafe.Pointer)(unsafe.Pointer(ctx))
	if cctx == nil {
		return nil, "the module is not loaded (nil C context)"
	}
	fields := (*[2]unsafe.Pointer)(cctx)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	if rc := C.hsm_check_list(cpath, fields[0], fields[1]); rc != 0 {
		return nil, listProblems[rc]
	}
	return fields[1], ""
}

// miekgValidated is the version of github.com/miekg/pkcs11 whose
// unexported layout fastList reads. TestFastPathLayout fails when go.mod
// moves to another one, until the layout is checked again.
const miekgValidated = "v1.1.2"

// linkedMiekg returns the version of github.com/miekg/pkcs11 this program
// links, or "" when the binary does not record its dependencies (test
// binaries do not), and then only the structural checks apply.
func linkedMiekg() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok || len(bi.Deps) == 0 {
		return ""
	}
	for _, d := range bi.Deps {
		if d.Path == "github.com/miekg/pkcs11" {
			if d.Replace != nil {
				return d.Version + " replaced by " + d.Replace.Path + " " + d.Replace.Version
			}
			return d.Version
		}
	}
	return "(not in the build information)"
}

// listProblems names the results of hsm_check_list.
var listProblems = map[C.int]string{
	1: "no module handle or function list",
	2: "the module at the path is not the one loaded (dlopen RTLD_NOLOAD)",
	3: "another copy of the module is loaded",
	4: "the function list's version is neither 2.x nor 3.x",
	5: "C_SignInit and C_Sign are not at the standard indexes of the function list",
	6: "C_DecryptInit and C_Decrypt are not at the standard indexes of the function list",
	7: "C_GetAttributeValue is not at the standard index of the function list",
}

// attrSlot is how many bytes fastAttrs gives each attribute: an RSA-8192
// modulus, an EC point of P-521, a label of any sensible length fit.
const attrSlot = 1024

// fastAttrs reads the attributes types of object h in one
// C_GetAttributeValue. A value that is absent (the object has no such
// attribute, or it is sensitive) is nil; one longer than attrSlot makes
// the whole read fail with CKR_BUFFER_TOO_SMALL, for the caller to read it
// another way. partial says the module refused some attribute
// (CKR_ATTRIBUTE_TYPE_INVALID, CKR_ATTRIBUTE_SENSITIVE): then the standard
// says the others are read all the same, but not every module does it (NSS
// softokn 3.87 leaves them empty), and the caller must judge the answer.
func fastAttrs(fl unsafe.Pointer, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, types []uint) (vals [][]byte, partial bool, err error) {
	n := len(types)
	ctypes := make([]C.hsm_ul, n)
	for i, t := range types {
		ctypes[i] = C.hsm_ul(t)
	}
	buf := make([]byte, n*attrSlot)
	lens := make([]C.hsm_ul, n)
	rv := C.hsm_get_attrs(fl, C.hsm_ul(s), C.hsm_ul(h), &ctypes[0], C.hsm_ul(n), bytesPtr(buf), attrSlot, &lens[0])
	switch rv {
	case pkcs11.CKR_OK:
	case pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_SENSITIVE:
		partial = true
	default:
		return nil, false, pkcs11.Error(rv)
	}
	out := make([][]byte, n)
	for i, l := range lens {
		switch {
		case l == C.hsm_ul(pkcs11.CK_UNAVAILABLE_INFORMATION):
		case l > attrSlot, partial && l == attrSlot:
			// Too long; or, in a partial answer, a length the module left
			// as it was given: read the slow way.
			return nil, partial, pkcs11.Error(pkcs11.CKR_BUFFER_TOO_SMALL)
		default:
			out[i] = buf[i*attrSlot : i*attrSlot+int(l) : i*attrSlot+int(l)]
		}
	}
	return out, partial, nil
}

// bytesPtr is the address of b's first byte, or nil when b is empty.
func bytesPtr(b []byte) *C.uchar {
	if len(b) == 0 {
		return nil
	}
	return (*C.uchar)(unsafe.Pointer(&b[0]))
}

// emptyData is what an empty input points to: modules may refuse a NULL
// data pointer even with length 0 (SoftHSM 2.6 answers CKR_ARGUMENTS_BAD),
// and crypto/ed25519 signs an empty message.
var emptyData = []byte{0}

// dataPtr is the address of b's first byte, never nil.
func dataPtr(b []byte) *C.uchar {
	if len(b) == 0 {
		b = emptyData
	}
	return (*C.uchar)(unsafe.Pointer(&b[0]))
}

// fastSign signs on session s with key h: two PKCS#11 calls when size is
// the signature's size. atInit says whether a failure came from
// C_SignInit.
func fastSign(fl unsafe.Pointer, s pkcs11.SessionHandle, mech *pkcs11.Mechanism, h pkcs11.ObjectHandle, data []byte, size int) ([]byte, bool, error) {
	out := make([]byte, size)
	n := C.hsm_ul(size)
	var stage C.int
	rv := C.hsm_sign(fl, C.hsm_ul(s), C.hsm_ul(mech.Mechanism), unsafe.Pointer(bytesPtr(mech.Parameter)), C.hsm_ul(len(mech.Parameter)), C.hsm_ul(h),
		dataPtr(data), C.hsm_ul(len(data)), bytesPtr(out), &n, &stage)
	return fastFinish(fl, C.IDX_SIGN, s, data, out, size, n, rv, stage)
}

// fastDecrypt decrypts ct on session s with key h and mechanism mech
// (CKM_RSA_PKCS, CKM_RSA_X_509, or CKM_RSA_PKCS_OAEP with oaep set): two
// PKCS#11 calls, since the plaintext is never longer than the modulus,
// size bytes. atInit says whether a failure came from C_DecryptInit.
func fastDecrypt(fl unsafe.Pointer, s pkcs11.SessionHandle, mech uint, oaep *pkcs11.OAEPParams, h pkcs11.ObjectHandle, ct []byte, size int) ([]byte, bool, error) {
	out := make([]byte, size)
	n := C.hsm_ul(size)
	var stage C.int
	var isOAEP C.int
	var hash, mgf, source C.hsm_ul
	var label []byte
	if oaep != nil {
		isOAEP, hash, mgf, source, label = 1, C.hsm_ul(oaep.HashAlg), C.hsm_ul(oaep.MGF), C.hsm_ul(oaep.SourceType), oaep.SourceData
	}
	rv := C.hsm_decrypt(fl, C.hsm_ul(s), C.hsm_ul(mech), isOAEP, hash, mgf, source, unsafe.Pointer(bytesPtr(label)), C.hsm_ul(len(label)), C.hsm_ul(h),
		dataPtr(ct), C.hsm_ul(len(ct)), bytesPtr(out), &n, &stage)
	return fastFinish(fl, C.IDX_DECRYPT, s, ct, out, size, n, rv, stage)
}

// fastFinish completes a two-call operation: when the token asked for a
// larger buffer than size, once more with that size (a third call). A
// failure after the init call is marked mayBeActive.
func fastFinish(fl unsafe.Pointer, op C.int, s pkcs11.SessionHandle, in, out []byte, size int, n C.hsm_ul, rv C.hsm_ul, stage C.int) ([]byte, bool, error) {
	if rv == pkcs11.CKR_BUFFER_TOO_SMALL && stage == 1 && int(n) > size {
		out = make([]byte, int(n))
		rv = C.hsm_again(fl, op, C.hsm_ul(s), dataPtr(in), C.hsm_ul(len(in)), bytesPtr(out), &n)
	}
	if rv != 0 {
		if stage == 0 {
			return nil, true, pkcs11.Error(rv)
		}
		return nil, false, mayBeActive(pkcs11.Error(rv))
	}
	if int(n) > len(out) {
		return nil, false, mayBeActive(fmt.Errorf("the module reported %d bytes of output in a %d-byte buffer", int(n), len(out)))
	}
	return out[:int(n)], false, nil
}
