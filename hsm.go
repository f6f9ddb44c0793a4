// Package hsm makes private keys that live in a Hardware Security Module,
// reached through PKCS#11, usable as ordinary crypto.Signer and
// crypto.Decrypter values, and survives the loss of the HSM.
//
// When a network HSM loses every member, the PKCS#11 library does not
// recover by itself: every call fails (CKR_DEVICE_ERROR and friends) until
// the application calls C_Finalize and C_Initialize. After that, every
// session and object handle from before is meaningless, and the same numbers
// are handed out again, so a stale handle can reach a different key.
//
// This package owns the library's life cycle. Every key carries the
// generation of the library instance it was found in; Provider.Reinitialize
// drains the calls in flight, finalizes, initializes again and moves to the
// next generation; keys of an earlier generation then fail with ErrStaleKey
// without making any PKCS#11 call.
//
// A Provider must be the only user of its PKCS#11 module in the process:
// Open refuses a module that another live Provider, or other code, has
// initialized (ErrModuleInUse).
package hsm
