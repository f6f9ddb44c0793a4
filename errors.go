package hsm

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/miekg/pkcs11"
)

// Sentinel errors. Match them with errors.Is; the error actually returned is
// usually an *Error that wraps one of them together with the operation and
// the generation.
var (
	// ErrClosed is returned by every method of a Provider, and of the keys it
	// handed out, once Close has been called.
	ErrClosed = newSentinel("provider is closed")

	// ErrStaleKey is returned by a key that was looked up in an earlier
	// generation of the PKCS#11 library. Its handles are meaningless now (the
	// same numbers may name a different key), so no PKCS#11 call was made.
	// Look the key up again.
	ErrStaleKey = newSentinel("key belongs to an earlier generation of the PKCS#11 library; look it up again")

	// ErrUnavailable is returned, without any PKCS#11 call, while the provider
	// is not admitting operations: during a re-initialization, or after one
	// failed and before one succeeds.
	ErrUnavailable = newSentinel("HSM unavailable")

	// ErrBusy is returned when every session of the pool stayed in use for
	// Config.SessionWaitTimeout.
	ErrBusy = newSentinel("all sessions busy")

	// ErrDrainTimeout is returned by Reinitialize and Close when operations
	// were still inside the PKCS#11 library after Config.DrainTimeout. The
	// library was not finalized (that would be undefined behaviour under a
	// running call); try again later.
	ErrDrainTimeout = newSentinel("operations still in flight after the drain timeout")

	// ErrKeyNotFound is returned when no private key matches a KeyRef.
	ErrKeyNotFound = newSentinel("key not found")

	// ErrAmbiguousKey is returned when more than one private key matches a
	// KeyRef. Select by both ID and label, or make them unique on the token.
	ErrAmbiguousKey = newSentinel("more than one key matches")

	// ErrUnsupportedKey is returned for a key type this package cannot use
	// for the requested purpose (for example an EC key as a Decrypter).
	ErrUnsupportedKey = newSentinel("unsupported key")

	// ErrInvalidOptions is returned for signing or decryption options that
	// do not fit the key or the input: nil opts, a hash the mechanism does
	// not support, a digest whose length does not match the hash, a PSS
	// salt too long for the key, ciphertext of the wrong size.
	ErrInvalidOptions = newSentinel("invalid options or input")

	// ErrDecryption is returned when the token rejects a ciphertext (bad
	// padding, OAEP label mismatch). Like rsa.ErrDecryption it says nothing
	// more, on purpose.
	ErrDecryption = newSentinel("decryption error")

	// ErrTokenNotFound is returned when no slot holds the configured token.
	ErrTokenNotFound = newSentinel("token not found")

	// ErrTokenChanged is returned by a re-initialization that finds a token
	// with a different serial number behind the configured selector. The
	// provider refuses to use it.
	ErrTokenChanged = newSentinel("a different token answers to the configured selector")

	// ErrPIN matches every PIN failure of the token (incorrect, locked,
	// expired, invalid), and an Open with another PIN or user type than the
	// Provider of this process that logged the same token in (refused
	// without sending it). A PIN error never triggers a retry or a
	// re-initialization: retrying would lock the token.
	ErrPIN = newSentinel("PIN rejected")

	// ErrModuleInUse is returned by Open when the PKCS#11 module was
	// initialized by other code in this process (C_Initialize answered
	// CKR_CRYPTOKI_ALREADY_INITIALIZED), or, while no Provider of it is
	// open, when the calls of a closed one have not returned (a frozen
	// HSM): its end, and the module's C_Finalize, wait for them. Another
	// Open of a module open in the process shares it (see Open).
	ErrModuleInUse = newSentinel("PKCS#11 module already in use in this process")

	// ErrConfig is returned by Open for an invalid Config.
	ErrConfig = newSentinel("invalid config")

	// ErrURI is matched by every error about a PKCS#11 URI.
	ErrURI = newSentinel("invalid PKCS#11 URI")

	// ErrKeyChanged is returned by a durable key when, in a new generation,
	// the key found under its CKA_CLASS, CKA_ID and CKA_LABEL has another
	// public key than the one pinned when it was first bound. The other key
	// is never used.
	ErrKeyChanged = newSentinel("the key on the token is not the key that was pinned")

	// ErrKeyMismatch is returned by a lookup (Signer, Decrypter, and the
	// durable and group kinds) when the private key under a reference is not
	// the private key of the public key found with it (its public key
	// object, or a certificate): a signature of a random challenge does not
	// verify under that public key. The pair is refused, never used. A
	// durable key that meets it in a later generation returns an error
	// matching both ErrKeyChanged and ErrKeyMismatch.
	ErrKeyMismatch = newSentinel("the private key is not the key of its public key")

	// ErrHung is the cause recorded when the HSM stops answering: a probe got
	// no answer, or calls inside the library made no progress, within
	// Config.ProbeTimeout. Open, Reinitialize and Close return an error
	// matching it when one of their own PKCS#11 calls did not return within
	// Config.ProbeTimeout, or an earlier one still has not.
	ErrHung = newSentinel("HSM not answering")

	// ErrKeyExists is returned by GenerateKey when a private key already has
	// the label or ID asked for, and by ImportCertificate when a certificate
	// already has the key's ID.
	ErrKeyExists = newSentinel("key or certificate already on the token")

	// ErrWriteProtected is returned by operations that change the token when
	// the token is write-protected (CKF_WRITE_PROTECTED). Signing and
	// decryption work on such a token.
	ErrWriteProtected = newSentinel("the token is write-protected")

	// ErrDeviceLost matches (errors.Is) every error whose PKCS#11 code means
	// that the connection to the HSM is gone and only a re-initialization
	// can bring it back: CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED,
	// CKR_TOKEN_NOT_PRESENT, CKR_TOKEN_NOT_RECOGNIZED,
	// CKR_CRYPTOKI_NOT_INITIALIZED.
	ErrDeviceLost = newSentinel("device lost")
)

// Error describes a failed operation. Every error returned by this package
// for an operation on a Provider or a key is an *Error, so the operation and
// the generation are always available through errors.As; the cause is in Err
// and is matched with errors.Is (sentinels) or errors.As (pkcs11.Error).
//
// An *Error may be shared between callers: treat it as read-only.
type Error struct {
	// Op is what was being done: "open", "sign", "decrypt", "find key",
	// "reinitialize", "close", ...
	Op string
	// Code is the PKCS#11 return value (CKR_*) when the token reported one,
	// else 0 (CKR_OK, which is never a failure).
	Code uint
	// Generation is the generation of the PKCS#11 library the operation ran
	// in, or was refused for.
	Generation uint64
	// Err is the cause: a sentinel of this package, a pkcs11.Error, or
	// either with more words (errors.Is and errors.As see through them).
	Err error
}

// Error reads "hsm: op (generation g): cause", e.g.
// "hsm: sign (generation 1): CKR_DEVICE_ERROR (0x30)".
func (e *Error) Error() string { return "hsm: " + e.text() }

func (e *Error) text() string {
	msg := e.Op
	if e.Generation != 0 {
		msg += " (generation " + strconv.FormatUint(e.Generation, 10) + ")"
	}
	if e.Err == nil {
		return msg + ": " + CodeName(e.Code)
	}
	return msg + ": " + text(e.Err)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// Is reports whether the PKCS#11 code carried by e belongs to target's
// family: a PIN failure matches ErrPIN, a device-loss code matches
// ErrDeviceLost.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrPIN:
		return isPINCode(e.Code)
	case ErrDeviceLost:
		return e.Code != 0 && classify(e.Code) == classDeviceLost
	}
	return false
}

// The errors of this package print "hsm: " once, however they are nested:
// each type has a text without it, which Error prefixes.

// sentinel is the type of the sentinel errors.
type sentinel struct{ msg string }

func newSentinel(msg string) error { return &sentinel{msg} }
func (s *sentinel) Error() string  { return "hsm: " + s.msg }

// detail is a cause with more words: "cause: msg".
type detail struct {
	err error
	msg string
}

func (d *detail) Error() string { return "hsm: " + text(d) }
func (d *detail) Unwrap() error { return d.err }

// wrapf returns err with the words of format: "err: words".
func wrapf(err error, format string, args ...any) error {
	return &detail{err, fmt.Sprintf(format, args...)}
}

// chain is an error that matches both what and why (errors.Is, As) and
// reads "what: why".
type chain struct{ what, why error }

func (c chain) Error() string   { return "hsm: " + text(c) }
func (c chain) Unwrap() []error { return []error{c.what, c.why} }

// step is the failure of a PKCS#11 function: "C_Initialize: CKR_...".
type step struct {
	fn  string
	err error
}

func (s *step) Error() string { return "hsm: " + text(s) }
func (s *step) Unwrap() error { return s.err }

func stepErr(fn string, err error) error { return &step{fn, err} }

// causedBy returns an error matching both what and why; what alone if why
// is nil.
func causedBy(what, why error) error {
	if why == nil {
		return what
	}
	return chain{what, why}
}

// text is err's message without the "hsm: " of this package's errors, and
// with PKCS#11 codes by name.
func text(err error) string {
	switch e := err.(type) {
	case *sentinel:
		return e.msg
	case *detail:
		return text(e.err) + ": " + e.msg
	case chain:
		return text(e.what) + ": " + text(e.why)
	case *step:
		return e.fn + ": " + text(e.err)
	case *Error:
		return e.text()
	case pkcs11.Error:
		return CodeName(uint(e))
	case tokenLoss:
		return text(e.err)
	}
	return err.Error()
}

// tokenLoss marks the failure of a call about one token (C_GetTokenInfo of
// its slot), made while the module itself answered (C_GetSlotList): the
// loss of that token, as far as the calls tell, not of the module. A
// Provider's automatic recovery then re-opens its token alone, without
// C_Finalize, when another Provider of the module answers (see
// Provider.tokenScoped).
type tokenLoss struct{ err error }

func (e tokenLoss) Error() string { return e.err.Error() }
func (e tokenLoss) Unwrap() error { return e.err }

// CodeName returns the symbolic name of a PKCS#11 return value with its
// number, e.g. "CKR_DEVICE_ERROR (0x30)"; a value the standard does not
// name reads "CKR 0x1234", a vendor's "CKR_VENDOR_DEFINED+0x12 (0x80000012)".
func CodeName(code uint) string {
	const vendor = 0x80000000
	if name, ok := ckrNames[code]; ok {
		return fmt.Sprintf("%s (0x%X)", name, code)
	}
	if code > vendor {
		return fmt.Sprintf("CKR_VENDOR_DEFINED+0x%X (0x%X)", code-vendor, code)
	}
	return fmt.Sprintf("CKR 0x%X", code)
}

// class is the category of a PKCS#11 code, as far as the health of the HSM
// connection is concerned.
type class int

const (
	// classNone: no error. No effect on health.
	classNone class = iota
	// classCaller: the token refused the request itself (mechanism, data
	// length, key type, PIN, attribute). No effect on health; do not retry
	// the same request.
	classCaller
	// classSession: the session is unusable (an operation left active, a
	// read-only session, ...); discard the session, the device is fine.
	classSession
	// classSuspect: could be the session or could be the device (session
	// handle invalid, general error, function failed). Probe before
	// deciding.
	classSuspect
	// classDeviceLost: the library has lost the device; only C_Finalize
	// and C_Initialize cure it (Provider.Reinitialize).
	classDeviceLost
)

func (c class) String() string {
	switch c {
	case classNone:
		return "none"
	case classCaller:
		return "caller"
	case classSession:
		return "session"
	case classSuspect:
		return "suspect"
	case classDeviceLost:
		return "device-lost"
	}
	return fmt.Sprintf("class(%d)", int(c))
}

// codeOf returns the PKCS#11 return value carried by err, if any: an
// *Error's Code, or a pkcs11.Error in its chain (errors.As).
func codeOf(err error) (uint, bool) {
	switch e := err.(type) { // the common cases, without errors.As's allocations
	case nil:
		return 0, false
	case pkcs11.Error:
		return uint(e), true
	case *Error:
		if e.Code != 0 {
			return e.Code, true
		}
	}
	var e *Error
	if errors.As(err, &e) && e.Code != 0 {
		return e.Code, true
	}
	var p pkcs11.Error
	if errors.As(err, &p) {
		return uint(p), true
	}
	return 0, false
}

// classify is a function of the code alone.
func classify(code uint) class {
	switch code {
	case pkcs11.CKR_OK:
		return classNone
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return classDeviceLost
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, // listed in Config.ProbeInterval's doc
		pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED,
		pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_HOST_MEMORY:
		return classSuspect
	case pkcs11.CKR_OPERATION_ACTIVE, pkcs11.CKR_OPERATION_NOT_INITIALIZED,
		pkcs11.CKR_SESSION_READ_ONLY, pkcs11.CKR_SESSION_COUNT,
		pkcs11.CKR_SESSION_EXISTS:
		return classSession
	}
	return classCaller
}

func isPINCode(code uint) bool {
	switch code {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_LOCKED:
		return true
	}
	return false
}

// p11err wraps a failure of op in generation gen, with its PKCS#11 code
// when it has one. A nil err stays nil.
func p11err(op string, gen uint64, err error) error {
	if err == nil {
		return nil
	}
	code, _ := codeOf(err)
	return &Error{Op: op, Code: code, Generation: gen, Err: err}
}

// opErr builds an *Error for a failure of op in generation gen: err with
// the words of format.
func opErr(op string, gen uint64, err error, format string, args ...any) error {
	return &Error{Op: op, Generation: gen, Err: wrapf(err, format, args...)}
}

// errNoKey is the error of an operation on a key value that holds no key:
// nil or the zero value, not one a Provider or Group handed out.
func errNoKey(op, typ string) error {
	return opErr(op, 0, ErrKeyNotFound, "a nil or zero hsm.%s holds no key: get keys from a Provider or a Group", typ)
}
