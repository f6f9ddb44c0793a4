package stepkms

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"unicode"

	"github.com/ce46d8f2/hsm"
	"go.step.sm/crypto/kms/uri"
)

// Scheme is the scheme of the URIs this package takes, the string "pkcs11".
const Scheme = "pkcs11"

// defaultModule is the PKCS#11 module used when the KMS URI has no
// module-path, as in step's pkcs11 backend: p11-kit's proxy, found in the
// system's library directories.
var defaultModule = "p11-kit-proxy.so"

func init() {
	switch runtime.GOOS {
	case "darwin":
		defaultModule = "p11-kit-proxy.dylib"
	case "windows":
		defaultModule = "p11-kit-proxy.dll"
	}
}

// kmsAttrs are the attributes a KMS URI may have. Step's backend ignores
// the object attributes in it, and so does New.
var kmsAttrs = []string{"module-path", "token", "serial", "slot-id", "max-sessions",
	"pin-value", "pin-source", "pin-prompt", "id", "object", "type"}

// parse parses a URI as step's uri.ParseWithScheme does (the attributes
// may be in the path, separated by ';', or in the query; values are
// percent-decoded, '+' is a space), but with errors that never show the
// URI, which may carry a PIN, and that match hsm.ErrURI. It refuses an
// attribute given twice, which step would silently take the first of.
func parse(what, raw string) (*uri.URI, error) {
	if raw == "" {
		return nil, uriErr("%s is empty", what)
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, uriErr("%s: %s", what, unquote(err))
	}
	switch {
	case u.Scheme == "":
		return nil, uriErr("%s: no scheme: want %s:...", what, Scheme)
	case !strings.EqualFold(u.Scheme, Scheme):
		return nil, uriErr("%s: scheme %q is not %s", what, truncate(u.Scheme), Scheme)
	case u.Opaque == "" && (u.Host != "" || u.Path != ""):
		return nil, uriErr("%s: attributes must follow %s: directly (%s:token=...), not a '/'", what, Scheme, Scheme)
	}
	v, err := url.ParseQuery(strings.ReplaceAll(u.Opaque, ";", "&"))
	if err != nil {
		return nil, uriErr("%s: path attributes: %s", what, unquote(err))
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return nil, uriErr("%s: query attributes: %s", what, unquote(err))
	}
	for name, vals := range v {
		if len(vals) > 1 || q.Has(name) {
			return nil, uriErr("%s: attribute %s given twice", what, truncate(name))
		}
	}
	for name, vals := range q {
		if len(vals) > 1 {
			return nil, uriErr("%s: attribute %s given twice", what, truncate(name))
		}
	}
	return &uri.URI{URL: u, Values: v}, nil
}

func uriErr(format string, args ...any) error {
	return &opError{msg: fmt.Sprintf(format, args...), causes: []error{hsm.ErrURI}}
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

var quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// unquote returns the message of a parser's error without the pieces of
// the input it quotes (a port, an escape), which may be part of a PIN.
func unquote(err error) string {
	return quoted.ReplaceAllString(err.Error(), `"..."`)
}

// redact returns a URI to print in a message: its attributes decoded and
// encoded again, so that no spelling of pin-value escapes, with the PIN
// replaced by REDACTED, and not too long.
func redact(raw string) string {
	u, err := parse("", raw)
	if err != nil {
		return "(a malformed URI)"
	}
	v := uri.Values(u)
	if v.Has("pin-value") {
		v.Set("pin-value", "REDACTED")
	}
	return truncate(uri.New(Scheme, v).String())
}

// attrs returns the names of u's attributes, path and query, sorted.
func attrs(u *uri.URI) []string {
	var names []string
	for name := range uri.Values(u) {
		names = append(names, name)
	}
	slices.Sort(names)
	return names
}

// config translates a KMS URI as step's pkcs11 backend takes it, and
// opts.Pin, into an hsm.Config over base.
func config(raw, optsPIN string, base hsm.Config) (hsm.Config, error) {
	u, err := parse("kms uri", raw)
	if err != nil {
		return hsm.Config{}, err
	}
	for _, name := range attrs(u) {
		if !slices.Contains(kmsAttrs, name) {
			return hsm.Config{}, uriErr("kms uri: attribute %q is not understood (known: %s)", truncate(name), strings.Join(kmsAttrs, ", "))
		}
	}
	c := base
	c.TokenLabel, c.TokenSerial, c.SlotNumber = u.Get("token"), u.Get("serial"), nil
	if u.Has("slot-id") {
		v := u.Get("slot-id")
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return hsm.Config{}, uriErr("kms uri: slot-id %q is not a slot number", truncate(v))
		}
		c.SlotNumber = &n
	}
	if u.Has("max-sessions") {
		v := u.Get("max-sessions")
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return hsm.Config{}, uriErr("kms uri: max-sessions %q is not a number of sessions", truncate(v))
		}
		c.MaxSessions = n
	}
	switch {
	case c.TokenLabel == "" && c.TokenSerial == "" && c.SlotNumber == nil:
		return hsm.Config{}, uriErr("kms uri: no token: give token, serial or slot-id")
	case c.TokenLabel != "" && c.TokenSerial != "":
		return hsm.Config{}, uriErr("kms uri: token and serial are mutually exclusive")
	case c.TokenLabel != "" && c.SlotNumber != nil:
		return hsm.Config{}, uriErr("kms uri: token and slot-id are mutually exclusive")
	case c.TokenSerial != "" && c.SlotNumber != nil:
		return hsm.Config{}, uriErr("kms uri: serial and slot-id are mutually exclusive")
	}

	module := u.Get("module-path")
	if module == "" {
		module = defaultModule
	}
	if c.Path, err = findModule(module); err != nil {
		return hsm.Config{}, err
	}

	// The PIN as step's uri.Pin finds it (pin-value, else pin-source, else
	// pin-prompt), else opts.Pin; no PIN attribute and no opts.Pin means a
	// token without login. Unlike step, an unreadable pin-source is an
	// error, not an empty PIN.
	hasPIN := u.Has("pin-value") || u.Has("pin-source") || u.Has("pin-prompt")
	switch {
	case u.Get("pin-value") != "":
		c.PIN = u.Get("pin-value")
	case u.Get("pin-source") != "":
		if c.PIN, err = readPIN(u.Get("pin-source")); err != nil {
			return hsm.Config{}, err
		}
	case u.Has("pin-prompt"):
		c.PIN = u.Pin()
	default:
		c.PIN = ""
	}
	if c.PIN == "" {
		c.PIN = optsPIN
	}
	c.NoLogin = c.PIN == "" && !hasPIN
	if c.PIN == "" && hasPIN {
		return hsm.Config{}, uriErr("kms uri: the PIN is empty (pin-value, pin-source or pin-prompt gave none, and opts.Pin is empty)")
	}
	return c, nil
}

// maxPIN bounds what is read of a pin-source file.
const maxPIN = 1024

// readPIN reads a pin-source as step does (file:/path, or a path; the
// content with trailing white space removed), from a regular file of at
// most 1 KiB, so that a FIFO or /dev/zero cannot block New.
//
// It is not the core's reader (behind hsm.URI.Config) because the dialects
// differ: step reads any path, relative ones included, through url.Parse,
// and takes the whole file without trailing white space; the core takes
// file:/path or /path and the first line. Both must be as safe and read a
// plain PIN file alike: internal/pintest's cases, run by the tests of
// both, say how.
func readPIN(source string) (string, error) {
	path := source
	if u, err := url.Parse(source); err == nil && (u.Scheme == "" || u.Scheme == "file") {
		switch {
		case u.Path != "":
			path = u.Path
		case u.Opaque != "":
			path = u.Opaque
		}
	}
	// O_NONBLOCK, then a look at what was opened: opening a FIFO without
	// a writer would block, and a path checked before it is opened can be
	// another file by then.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return "", uriErr("kms uri: pin-source: %v", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", uriErr("kms uri: pin-source: %v", err)
	}
	if !fi.Mode().IsRegular() {
		return "", uriErr("kms uri: pin-source %s is not a regular file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPIN+1))
	switch {
	case err != nil:
		return "", uriErr("kms uri: pin-source: %v", err)
	case len(b) > maxPIN:
		return "", uriErr("kms uri: pin-source %s is longer than %d bytes", path, maxPIN)
	}
	return strings.TrimRightFunc(string(b), unicode.IsSpace), nil
}

// libDirs are searched for a module named without a directory, in the
// order of the dynamic loader's defaults, after LD_LIBRARY_PATH.
var libDirs = []string{"/usr/local/lib", "/usr/lib/" + multiarch(), "/lib/" + multiarch(),
	"/usr/lib64", "/lib64", "/usr/lib", "/lib", "/opt/homebrew/lib"}

func multiarch() string {
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64-linux-gnu"
	case "arm64":
		return "aarch64-linux-gnu"
	case "386":
		return "i386-linux-gnu"
	}
	return runtime.GOARCH + "-linux-gnu"
}

// findModule returns the file of the PKCS#11 module. Step's backend hands
// the name to dlopen, which searches the library path for a bare name
// (p11-kit-proxy.so); hsm.Open takes a file name, so a name without a
// directory is looked up here, in LD_LIBRARY_PATH and the usual library
// directories.
func findModule(name string) (string, error) {
	if strings.ContainsRune(name, '/') || strings.ContainsRune(name, filepath.Separator) {
		return name, nil
	}
	dirs := append(filepath.SplitList(os.Getenv("LD_LIBRARY_PATH")), libDirs...)
	for _, d := range dirs {
		if d == "" {
			continue
		}
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() {
			return p, nil
		}
	}
	return "", &opError{msg: fmt.Sprintf("kms uri: module %q not found in LD_LIBRARY_PATH or %s: give module-path with the module's full path", truncate(name), strings.Join(libDirs, ", ")),
		causes: []error{hsm.ErrURI, hsm.ErrConfig}}
}

// object returns the CKA_ID and CKA_LABEL a key name gives, as step's
// pkcs11 backend reads them: id is hexadecimal when it is a valid hex
// string (7331, 0x7331, 73:31; an odd length gets a leading 0), else its
// bytes as given (percent-encoding, %73%31); object is the label. Other
// attributes are ignored, as step does. Both may not be empty.
func object(raw string) (id []byte, label string, u *uri.URI, err error) {
	u, err = parse("key name", raw)
	if err != nil {
		return nil, "", nil, err
	}
	id, label = u.GetEncoded("id"), u.Get("object")
	if len(id) == 0 && label == "" {
		return nil, "", nil, uriErr("key name %s: give id, object or both", redact(raw))
	}
	return id, label, u, nil
}

// certSerial returns the certificate serial number a name gives with
// serial=, hexadecimal as in step's backend (which also takes 0x, colons and
// an odd number of digits here), or nil.
func certSerial(u *uri.URI, raw string) (*big.Int, error) {
	v := u.Get("serial")
	if v == "" {
		return nil, nil
	}
	hx := strings.ReplaceAll(strings.TrimPrefix(strings.TrimPrefix(v, "0x"), "0X"), ":", "")
	if len(hx)%2 == 1 {
		hx = "0" + hx
	}
	b, err := hex.DecodeString(hx)
	if hx == "" || err != nil {
		return nil, uriErr("name %s: serial %q is not a hexadecimal serial number", redact(raw), truncate(v))
	}
	return new(big.Int).SetBytes(b), nil
}

// keyName returns the name of a key with the given ID and label, in
// step's form: pkcs11:id=7331;object=name (id in hex).
func keyName(ref hsm.KeyRef) string {
	v := url.Values{}
	if len(ref.ID) > 0 {
		v.Set("id", hex.EncodeToString(ref.ID))
	}
	if ref.Label != "" {
		v.Set("object", ref.Label)
	}
	return uri.New(Scheme, v).String()
}
