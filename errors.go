package hsm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miekg/pkcs11"
)

// Sentinel errors. Match them with errors.Is; the error actually returned is
// usually an *Error that wraps one of them together with the operation and
// the generation.
var (
	// ErrClosed is returned by every method of a Provider, and of the keys it
	// handed out, once Close has been called.
	ErrClosed = errors.New("hsm: provider is closed")

	// ErrStaleKey is returned by a key that was looked up in an earlier
	// generation of the PKCS#11 library. Its handles are meaningless now (the
	// same numbers may name a different key), so no PKCS#11 call was made.
	// Look the key up again.
	ErrStaleKey = errors.New("hsm: key belongs to an earlier generation of the PKCS#11 library; look it up again")

	// ErrUnavailable is returned, without any PKCS#11 call, while the provider
	// is not admitting operations: during a re-initialization, or after one
	// failed and before one succeeds.
	ErrUnavailable = errors.New("hsm: HSM unavailable")

	// ErrBusy is returned when every session of the pool stayed in use for
	// Config.SessionWaitTimeout.
	ErrBusy = errors.New("hsm: all sessions busy")

	// ErrDrainTimeout is returned by Reinitialize and Close when operations
	// were still inside the PKCS#11 library after Config.DrainTimeout. The
	// library was not finalized (that would be undefined behaviour under a
	// running call); try again later.
	ErrDrainTimeout = errors.New("hsm: operations still in flight after the drain timeout")

	// ErrKeyNotFound is returned when no private key matches a KeyRef.
	ErrKeyNotFound = errors.New("hsm: key not found")

	// ErrAmbiguousKey is returned when more than one private key matches a
	// KeyRef. Select by both ID and label, or make them unique on the token.
	ErrAmbiguousKey = errors.New("hsm: more than one key matches")

	// ErrUnsupportedKey is returned for a key type this package cannot use
	// for the requested purpose (for example an EC key as a Decrypter).
	ErrUnsupportedKey = errors.New("hsm: unsupported key")

	// ErrInvalidOptions is returned for signing or decryption options that
	// do not fit the key or the input: nil opts, a hash the mechanism does
	// not support, a digest whose length does not match the hash, a PSS
	// salt too long for the key, ciphertext of the wrong size.
	ErrInvalidOptions = errors.New("hsm: invalid options or input")

	// ErrDecryption is returned when the token rejects a ciphertext (bad
	// padding, OAEP label mismatch). Like rsa.ErrDecryption it says nothing
	// more, on purpose.
	ErrDecryption = errors.New("hsm: decryption error")

	// ErrTokenNotFound is returned when no slot holds the configured token.
	ErrTokenNotFound = errors.New("hsm: token not found")

	// ErrTokenChanged is returned by a re-initialization that finds a token
	// with a different serial number behind the configured selector. The
	// provider refuses to use it.
	ErrTokenChanged = errors.New("hsm: a different token answers to the configured selector")

	// ErrPIN matches every PIN failure of the token (incorrect, locked,
	// expired, invalid). A PIN error never triggers a retry or a
	// re-initialization: retrying would lock the token.
	ErrPIN = errors.New("hsm: PIN rejected")

	// ErrModuleInUse is returned by Open when the PKCS#11 module is already
	// owned by a live Provider of this process, or was initialized by other
	// code in this process.
	ErrModuleInUse = errors.New("hsm: PKCS#11 module already in use in this process")

	// ErrConfig is returned by Open for an invalid Config.
	ErrConfig = errors.New("hsm: invalid config")
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
	// Err is the cause: a pkcs11.Error when Code is set, otherwise one of the
	// sentinel errors of this package or another error.
	Err error
}

func (e *Error) Error() string {
	msg := "hsm: " + e.Op
	if e.Generation != 0 {
		msg += fmt.Sprintf(" (generation %d)", e.Generation)
	}
	if e.Err == nil {
		return msg + ": " + CodeName(e.Code)
	}
	// Sentinels already carry the "hsm: " prefix; do not repeat it.
	cause := e.Err.Error()
	if len(cause) > 5 && cause[:5] == "hsm: " {
		cause = cause[5:]
	}
	if e.Code != 0 { // "pkcs11: 0x30: CKR_DEVICE_ERROR" reads "CKR_DEVICE_ERROR (0x30)"
		cause = strings.Replace(cause, pkcs11.Error(e.Code).Error(), CodeName(e.Code), 1)
	}
	return msg + ": " + cause
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
		return e.Code != 0 && classifyCode(e.Code) == ClassDeviceLost
	}
	return false
}

// ErrDeviceLost matches (errors.Is) every error whose PKCS#11 code means
// the connection to the HSM is gone and only a re-initialization can bring
// it back. See Classify.
var ErrDeviceLost = errors.New("hsm: device lost")

// CodeName returns the symbolic name of a PKCS#11 return value with its
// number, e.g. "CKR_DEVICE_ERROR (0x30)".
func CodeName(code uint) string {
	s := pkcs11.Error(code).Error() // "pkcs11: 0x30: CKR_DEVICE_ERROR"
	name := ""
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == ' ' {
			name = s[i+1:]
			break
		}
	}
	if name == "" || name == ":" {
		return fmt.Sprintf("CKR 0x%X", code)
	}
	return fmt.Sprintf("%s (0x%X)", name, code)
}

// Class is the category of an error, as far as the health of the HSM
// connection is concerned. It is a function of the PKCS#11 code alone.
type Class int

const (
	// ClassNone: no error, or an error that does not come from the token
	// (bad options, key not found, ...). No effect on health.
	ClassNone Class = iota
	// ClassCaller: the token refused the request itself (mechanism, data
	// length, key type, PIN, attribute). No effect on health; do not retry
	// the same request.
	ClassCaller
	// ClassSession: the session is unusable (an operation left active, a
	// read-only session, ...); discard the session, the device is fine.
	ClassSession
	// ClassSuspect: could be the session or could be the device (session
	// handle invalid, general error, function failed). Probe before deciding.
	ClassSuspect
	// ClassDeviceLost: the library has lost the device; only C_Finalize and
	// C_Initialize cure it (Provider.Reinitialize).
	ClassDeviceLost
)

func (c Class) String() string {
	switch c {
	case ClassNone:
		return "none"
	case ClassCaller:
		return "caller"
	case ClassSession:
		return "session"
	case ClassSuspect:
		return "suspect"
	case ClassDeviceLost:
		return "device-lost"
	}
	return fmt.Sprintf("Class(%d)", int(c))
}

// Classify returns the class of err. It looks through any wrapping that
// supports errors.As (this package's *Error, fmt.Errorf with %w) for a
// pkcs11.Error, and also through the older github.com/pkg/errors wrapping
// (a Cause method), as used by some releases of crypto11.
func Classify(err error) Class {
	code, ok := CodeOf(err)
	if !ok {
		return ClassNone
	}
	return classifyCode(code)
}

// CodeOf returns the PKCS#11 return value carried by err, if any.
func CodeOf(err error) (uint, bool) {
	for err != nil {
		var e *Error
		if errors.As(err, &e) && e.Code != 0 {
			return e.Code, true
		}
		var p pkcs11.Error
		if errors.As(err, &p) {
			return uint(p), true
		}
		c, ok := err.(interface{ Cause() error })
		if !ok {
			return 0, false
		}
		err = c.Cause()
	}
	return 0, false
}

// IsDeviceLost reports whether err means the HSM connection is lost and a
// re-initialization is needed.
func IsDeviceLost(err error) bool { return Classify(err) == ClassDeviceLost }

func classifyCode(code uint) Class {
	switch code {
	case pkcs11.CKR_OK:
		return ClassNone
	case pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_TOKEN_NOT_RECOGNIZED,
		pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED:
		return ClassDeviceLost
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_GENERAL_ERROR, pkcs11.CKR_FUNCTION_FAILED,
		pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_HOST_MEMORY:
		return ClassSuspect
	case pkcs11.CKR_OPERATION_ACTIVE, pkcs11.CKR_OPERATION_NOT_INITIALIZED,
		pkcs11.CKR_SESSION_READ_ONLY, pkcs11.CKR_SESSION_COUNT,
		pkcs11.CKR_SESSION_EXISTS:
		return ClassSession
	}
	return ClassCaller
}

func isPINCode(code uint) bool {
	switch code {
	case pkcs11.CKR_PIN_INCORRECT, pkcs11.CKR_PIN_INVALID, pkcs11.CKR_PIN_LEN_RANGE,
		pkcs11.CKR_PIN_EXPIRED, pkcs11.CKR_PIN_LOCKED:
		return true
	}
	return false
}

// causedBy returns an error matching both what and why (errors.Is, As),
// reading "what: why" without a second "hsm: " prefix.
func causedBy(what, why error) error {
	if why == nil {
		return what
	}
	return chain{what, why}
}

type chain struct{ what, why error }

func (c chain) Error() string {
	return c.what.Error() + ": " + strings.TrimPrefix(c.why.Error(), "hsm: ")
}
func (c chain) Unwrap() []error { return []error{c.what, c.why} }

// p11err wraps a PKCS#11 failure of op in generation gen. A nil err stays nil.
func p11err(op string, gen uint64, err error) error {
	if err == nil {
		return nil
	}
	var code pkcs11.Error
	if errors.As(err, &code) {
		return &Error{Op: op, Code: uint(code), Generation: gen, Err: err}
	}
	return &Error{Op: op, Generation: gen, Err: err}
}

// opErr builds an *Error for a failure that does not come from the token.
func opErr(op string, gen uint64, err error, format string, args ...any) error {
	if format != "" {
		err = fmt.Errorf("%w: "+format, append([]any{err}, args...)...)
	}
	return &Error{Op: op, Generation: gen, Err: err}
}
