package hsm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Defaults for the zero values of Config, all in one place.
const (
	DefaultMaxSessions        = 32
	DefaultSessionWaitTimeout = 10 * time.Second
	DefaultDrainTimeout       = 30 * time.Second // above Luna's 20 s command timeout
	DefaultProbeInterval      = 10 * time.Second
	DefaultProbeTimeout       = 5 * time.Second
	DefaultRecoveryBackoffMin = 50 * time.Millisecond
	DefaultRecoveryBackoffMax = time.Second
)

// Config says which PKCS#11 module and token to use, and how.
type Config struct {
	// Path is the file name of the PKCS#11 module (shared library), e.g.
	// /usr/lib/softhsm/libsofthsm2.so.
	Path string

	// Exactly one of TokenLabel, TokenSerial and SlotNumber selects the
	// token. Prefer the label or the serial: slot numbers can change when
	// the library is re-initialized (HA groups, remoting renumber slots).
	TokenLabel  string
	TokenSerial string
	SlotNumber  *int

	// InitArgs, when set, is passed to C_Initialize as the NUL-terminated
	// string CK_C_INITIALIZE_ARGS.pReserved, at Open and at every
	// re-initialization. NSS's softokn needs it, e.g.
	//	configdir='sql:/etc/pki/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db' flags=
	// (p11-kit's module configurations call it x-init-reserved, and so does
	// a PKCS#11 URI here).
	InitArgs string

	// PIN is the user PIN. It is required unless NoLogin is set. It is
	// never printed by String or %v.
	PIN string
	// NoLogin skips C_Login, for tokens whose keys need none.
	NoLogin bool
	// UserType is the user type of C_Login. Zero means CKU_USER; Thales
	// Luna's crypto user is CKU_CRYPTO_USER (0x80000001). A key with
	// CKA_ALWAYS_AUTHENTICATE is logged in for again, with
	// CKU_CONTEXT_SPECIFIC and the PIN, before each signature or
	// decryption.
	UserType uint

	// MaxSessions bounds the number of sessions used for operations, and so
	// the number of goroutines that can be inside the PKCS#11 library at
	// once. Zero means DefaultMaxSessions. It is lowered to what the token
	// reports it supports.
	MaxSessions int

	// SessionWaitTimeout bounds how long an operation waits for a free
	// session when all MaxSessions are busy; then it fails with ErrBusy (and
	// the provider probes the HSM). An operation waiting for a session fails
	// at once with ErrUnavailable when the provider becomes unavailable.
	// Zero means DefaultSessionWaitTimeout.
	SessionWaitTimeout time.Duration

	// DrainTimeout bounds how long Reinitialize and Close wait for calls
	// already inside the PKCS#11 library to return before they finalize it.
	// It should be longer than the HSM's own command timeout (20 s for
	// Luna). Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration

	// Logger receives state changes (HSM lost, re-initialized, failed),
	// never a line per failed operation; failed re-initializations are
	// logged at most once a minute. Nil means no logging.
	Logger *slog.Logger

	// ProbeInterval is how often the provider checks, while healthy, that
	// the token is present with the same serial and still logged in. An
	// operation that fails with a code that may mean a lost HSM as well as
	// a bad session or handle (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED,
	// CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
	// CKR_OBJECT_HANDLE_INVALID, CKR_KEY_HANDLE_INVALID,
	// CKR_USER_NOT_LOGGED_IN, CKR_HOST_MEMORY) triggers a probe at once.
	// Zero means DefaultProbeInterval; negative disables the periodic probe
	// (those codes still trigger one).
	ProbeInterval time.Duration
	// ProbeTimeout is how long the HSM may stay silent before the provider
	// decides that it hangs (ErrHung) and becomes unavailable: a probe
	// without an answer, or calls inside the library while none completes
	// (a watchdog looks every ProbeTimeout/10, at most every 500ms, so a
	// frozen HSM under load is noticed within ProbeTimeout plus that; a key
	// generation, which may take longer, does not count as such a call). It
	// also bounds each of the provider's own conversations with the module:
	// C_Initialize to C_Login at Open and at each re-initialization,
	// C_Finalize, and C_Logout with C_Finalize at Close. Such a call that
	// does not return in time fails with ErrHung and is left to return when
	// the module lets it; no other of these calls starts until it has.
	// Zero means DefaultProbeTimeout.
	ProbeTimeout time.Duration

	// DisableAutoRecovery stops the provider from re-initializing by itself
	// when it becomes unavailable; call Reinitialize instead.
	DisableAutoRecovery bool
	// RecoveryBackoffMin and RecoveryBackoffMax bound the wait between two
	// automatic re-initializations that fail: it starts at the minimum and
	// doubles up to the maximum, with jitter. Zero means
	// DefaultRecoveryBackoffMin and DefaultRecoveryBackoffMax; the maximum
	// is how late, at worst, recovery notices that the HSM is back.
	RecoveryBackoffMin, RecoveryBackoffMax time.Duration

	// OnStateChange, if set, is called for every change of State, in order,
	// from a goroutine of the provider (never with a lock held: it may call
	// the provider, Reinitialize and Close included). A slow callback does
	// not slow the provider: up to 256 changes wait for it, and when more
	// come the oldest waiting one is dropped (and counted in
	// Stats.EventsDropped), so that the last change delivered is the
	// latest. Close delivers the changes queued before it, StateClosed
	// last, and waits for the callback within its own bound, except when
	// called from inside it (see Provider.Close).
	OnStateChange func(StateChange)
}

// String describes the configuration without the PIN.
func (c Config) String() string {
	sel := "no token selector"
	switch {
	case c.TokenLabel != "":
		sel = fmt.Sprintf("token label %q", c.TokenLabel)
	case c.TokenSerial != "":
		sel = fmt.Sprintf("token serial %q", c.TokenSerial)
	case c.SlotNumber != nil:
		sel = fmt.Sprintf("slot %d", *c.SlotNumber)
	}
	pin := "no PIN"
	if c.PIN != "" {
		pin = "PIN set"
	}
	return fmt.Sprintf("hsm.Config{module %q, %s, %s}", c.Path, sel, pin)
}

// GoString is String, so that %#v does not print the PIN either.
func (c Config) GoString() string { return c.String() }

// Format makes every verb print String, so that %+v does not print the PIN.
func (c Config) Format(f fmt.State, verb rune) { _, _ = io.WriteString(f, c.String()) }

func (c *Config) validate() error {
	var sel []string
	if c.TokenLabel != "" {
		sel = append(sel, "TokenLabel")
	}
	if c.TokenSerial != "" {
		sel = append(sel, "TokenSerial")
	}
	if c.SlotNumber != nil {
		sel = append(sel, "SlotNumber")
	}
	switch {
	case c.Path == "":
		return wrapf(ErrConfig, "Path (the PKCS#11 module) is empty")
	case len(sel) == 0:
		return wrapf(ErrConfig, "no token selector: set exactly one of TokenLabel, TokenSerial, SlotNumber")
	case len(sel) > 1:
		return wrapf(ErrConfig, "%d token selectors (%v): set exactly one", len(sel), sel)
	case c.SlotNumber != nil && *c.SlotNumber < 0:
		return wrapf(ErrConfig, "SlotNumber %d is negative", *c.SlotNumber)
	case c.PIN == "" && !c.NoLogin:
		return wrapf(ErrConfig, "PIN is empty (set NoLogin for tokens that need no login)")
	case strings.IndexByte(c.InitArgs, 0) >= 0:
		return wrapf(ErrConfig, "InitArgs has a NUL byte: C_Initialize takes it as a C string")
	case c.PIN != "" && checkPIN(c.PIN) != nil:
		return causedBy(ErrConfig, checkPIN(c.PIN))
	case c.MaxSessions < 0:
		return wrapf(ErrConfig, "MaxSessions %d is negative", c.MaxSessions)
	case c.DrainTimeout < 0 || c.SessionWaitTimeout < 0 || c.ProbeTimeout < 0 || c.RecoveryBackoffMin < 0 || c.RecoveryBackoffMax < 0:
		return wrapf(ErrConfig, "negative timeout")
	}
	orDefault(&c.MaxSessions, DefaultMaxSessions)
	orDefault(&c.DrainTimeout, DefaultDrainTimeout)
	orDefault(&c.SessionWaitTimeout, DefaultSessionWaitTimeout)
	orDefault(&c.ProbeInterval, DefaultProbeInterval)
	orDefault(&c.ProbeTimeout, DefaultProbeTimeout)
	orDefault(&c.RecoveryBackoffMin, DefaultRecoveryBackoffMin)
	orDefault(&c.RecoveryBackoffMax, DefaultRecoveryBackoffMax)
	if c.RecoveryBackoffMax < c.RecoveryBackoffMin {
		return wrapf(ErrConfig, "RecoveryBackoffMax %v is below RecoveryBackoffMin %v", c.RecoveryBackoffMax, c.RecoveryBackoffMin)
	}
	return nil
}

// checkPIN refuses a PIN no token has, before it costs a login attempt:
// PKCS#11 PINs are UTF-8 text, so invalid UTF-8, a NUL byte or another
// control character (a line end read from a file, a byte of /dev/zero), or
// an invisible format or separator character (a byte-order mark, U+2028)
// is a mistake. The error does not show the PIN.
func checkPIN(pin string) error {
	if !utf8.ValidString(pin) {
		return errors.New("the PIN is not valid UTF-8")
	}
	for i, r := range pin {
		switch {
		case unicode.IsControl(r):
			return fmt.Errorf("the PIN has control character %U at byte %d", r, i)
		case unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp):
			return fmt.Errorf("the PIN has invisible character %U at byte %d", r, i)
		}
	}
	return nil
}

// orDefault sets *v to def when it is the zero value.
func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}
