//go:build windows

package hsm

import (
	"unsafe"

	"github.com/miekg/pkcs11"
)

// On Windows the module's structures are packed; the two-call path is not
// used there (fastList reports it unavailable).
func fastList(*pkcs11.Ctx, string) (unsafe.Pointer, string) {
	return nil, "not on Windows (packed structures)"
}

func fastAttrs(unsafe.Pointer, pkcs11.SessionHandle, pkcs11.ObjectHandle, []uint) ([][]byte, bool, error) {
	return nil, false, pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
}

func fastSign(unsafe.Pointer, pkcs11.SessionHandle, *pkcs11.Mechanism, pkcs11.ObjectHandle, []byte, int) ([]byte, bool, error) {
	return nil, true, pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
}

func fastDecrypt(unsafe.Pointer, pkcs11.SessionHandle, uint, *pkcs11.OAEPParams, pkcs11.ObjectHandle, []byte, int) ([]byte, bool, error) {
	return nil, true, pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
}
