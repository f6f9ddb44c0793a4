package hsm

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/miekg/pkcs11"
)

// URI is a parsed PKCS#11 URI (RFC 7512), the way p11-kit, GnuTLS and
// OpenSSL's pkcs11-provider name a module, a token and an object:
//
//	pkcs11:token=prod;object=tls;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin
//
// Values are stored decoded. String and %v never print the PIN.
type URI struct {
	// Path attributes.
	Token, Manufacturer, Serial, Model                      string
	LibraryManufacturer, LibraryDescription, LibraryVersion string
	Object, Type                                            string
	ID                                                      []byte // nil when absent
	SlotDescription, SlotManufacturer                       string
	SlotID                                                  *uint64
	// Query attributes.
	PINSource, PINValue, ModuleName, ModulePath string
	// Vendor holds attributes this package does not know, by name. Config
	// and KeyRef refuse a URI that has any.
	Vendor map[string]string

	present map[string]bool // which standard attributes were given
}

var pathAttrs = []string{"token", "manufacturer", "serial", "model", "library-manufacturer",
	"library-version", "library-description", "object", "type", "id", "slot-description",
	"slot-manufacturer", "slot-id"}

var queryAttrs = []string{"pin-source", "pin-value", "module-name", "module-path"}

// ParseURI parses a PKCS#11 URI. It rejects what RFC 7512 does not allow:
// another scheme, an attribute given twice, an empty attribute name,
// malformed percent-encoding, characters that must be percent-encoded, a
// type other than public, private, cert, secret-key or data, a slot-id or
// library-version that is not a number. Vendor attributes (unknown names)
// are kept in Vendor.
func ParseURI(s string) (*URI, error) {
	if len(s) < 7 || !strings.EqualFold(s[:7], "pkcs11:") {
		return nil, uriErr("%q does not start with pkcs11:", truncate(s))
	}
	rest := s[7:]
	path, query, hasQuery := strings.Cut(rest, "?")
	u := &URI{present: map[string]bool{}}
	if path != "" {
		for _, attr := range strings.Split(path, ";") {
			if err := setAttr(u, attr, false); err != nil {
				return nil, err
			}
		}
	}
	if hasQuery && query != "" {
		for _, attr := range strings.Split(query, "&") {
			if err := setAttr(u, attr, true); err != nil {
				return nil, err
			}
		}
	}
	if u.present["pin-value"] && u.present["pin-source"] {
		return nil, uriErr("both pin-value and pin-source: give one")
	}
	return u, nil
}

func uriErr(format string, args ...any) error {
	return wrapf(ErrURI, format, args...)
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// setAttr decodes one attribute into u.
func setAttr(u *URI, attr string, query bool) error {
	where := "path"
	if query {
		where = "query"
	}
	name, raw, ok := strings.Cut(attr, "=")
	if !ok {
		return uriErr("%s attribute %q has no '='", where, truncate(attr))
	}
	if name == "" {
		return uriErr("empty attribute name in the %s", where)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return uriErr("attribute name %q has a character other than letters, digits, '-' and '_'", truncate(name))
		}
	}
	val, err := unescape(raw, query)
	if err != nil {
		return uriErr("attribute %s: %v", name, err)
	}
	known := pathAttrs
	if query {
		known = queryAttrs
	}
	if !slices.Contains(known, name) {
		if slices.Contains(pathAttrs, name) || slices.Contains(queryAttrs, name) {
			other := "query"
			if query {
				other = "path"
			}
			return uriErr("attribute %s belongs in the %s, not the %s", name, other, where)
		}
		if u.Vendor == nil {
			u.Vendor = map[string]string{}
		}
		if _, dup := u.Vendor[name]; dup {
			return uriErr("attribute %s given twice", name)
		}
		u.Vendor[name] = string(val)
		return nil
	}
	if u.present[name] {
		return uriErr("attribute %s given twice", name)
	}
	u.present[name] = true
	v := string(val)
	switch name {
	case "token":
		u.Token = v
	case "manufacturer":
		u.Manufacturer = v
	case "serial":
		u.Serial = v
	case "model":
		u.Model = v
	case "library-manufacturer":
		u.LibraryManufacturer = v
	case "library-description":
		u.LibraryDescription = v
	case "library-version":
		if !isVersion(v) {
			return uriErr("library-version %q is not M or M.N", v)
		}
		u.LibraryVersion = v
	case "object":
		u.Object = v
	case "type":
		switch v {
		case "public", "private", "cert", "secret-key", "data":
		default:
			return uriErr("type %q is not public, private, cert, secret-key or data", v)
		}
		u.Type = v
	case "id":
		u.ID = val
		if u.ID == nil {
			u.ID = []byte{}
		}
	case "slot-description":
		u.SlotDescription = v
	case "slot-manufacturer":
		u.SlotManufacturer = v
	case "slot-id":
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || v == "" || v[0] == '+' {
			return uriErr("slot-id %q is not a decimal number", v)
		}
		u.SlotID = &n
	case "pin-source":
		u.PINSource = v
	case "pin-value":
		u.PINValue = v
	case "module-name":
		u.ModuleName = v
	case "module-path":
		u.ModulePath = v
	}
	return nil
}

func isVersion(v string) bool {
	major, minor, dot := strings.Cut(v, ".")
	digits := func(s string) bool {
		if s == "" {
			return false
		}
		for _, c := range s {
			if c < '0' || c > '9' {
				return false
			}
		}
		return true
	}
	return digits(major) && (!dot || digits(minor))
}

// Characters allowed unencoded (RFC 7512 pk11-pchar and pk11-qchar).
func allowed(c byte, query bool) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	switch c {
	case '-', '.', '_', '~', ':', '[', ']', '@', '!', '$', '\'', '(', ')', '*', '+', ',', '=':
		return true
	case '&': // separates query attributes; allowed raw in the path
		return !query
	case '/', '?', '|':
		return query
	}
	return false
}

func unescape(s string, query bool) ([]byte, error) {
	var out []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '%' {
			if i+2 >= len(s) {
				return nil, fmt.Errorf("truncated percent-encoding at %q", s[i:])
			}
			h, ok1 := unhex(s[i+1])
			l, ok2 := unhex(s[i+2])
			if !ok1 || !ok2 {
				return nil, fmt.Errorf("bad percent-encoding %q", s[i:i+3])
			}
			out = append(out, h<<4|l)
			i += 2
			continue
		}
		if !allowed(c, query) {
			return nil, fmt.Errorf("character %q must be percent-encoded", c)
		}
		out = append(out, c)
	}
	return out, nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

func escape(b []byte, query bool) string {
	var sb strings.Builder
	for _, c := range b {
		if allowed(c, query) && c != '%' && c != ';' && c != '&' {
			sb.WriteByte(c)
			continue
		}
		fmt.Fprintf(&sb, "%%%02X", c)
	}
	return sb.String()
}

// encode writes u back as a URI; the PIN value only with pin.
func (u URI) encode(pin bool) string {
	var path, query []string
	add := func(list *[]string, name string, val []byte, query bool) {
		*list = append(*list, name+"="+escape(val, query))
	}
	strs := map[string]string{
		"token": u.Token, "manufacturer": u.Manufacturer, "serial": u.Serial, "model": u.Model,
		"library-manufacturer": u.LibraryManufacturer, "library-description": u.LibraryDescription,
		"library-version": u.LibraryVersion, "object": u.Object, "type": u.Type,
		"slot-description": u.SlotDescription, "slot-manufacturer": u.SlotManufacturer,
	}
	for _, name := range pathAttrs {
		switch {
		case name == "id":
			if u.ID != nil {
				add(&path, name, u.ID, false)
			}
		case name == "slot-id":
			if u.SlotID != nil {
				path = append(path, "slot-id="+strconv.FormatUint(*u.SlotID, 10))
			}
		case strs[name] != "" || u.present[name]:
			add(&path, name, []byte(strs[name]), false)
		}
	}
	for _, name := range sortedKeys(u.Vendor) {
		add(&path, name, []byte(u.Vendor[name]), false)
	}
	qs := map[string]string{"pin-source": u.PINSource, "module-name": u.ModuleName, "module-path": u.ModulePath}
	for _, name := range queryAttrs {
		switch {
		case name == "pin-value":
			if u.PINValue != "" || u.present[name] {
				if pin {
					add(&query, name, []byte(u.PINValue), true)
				} else {
					query = append(query, "pin-value=REDACTED")
				}
			}
		case qs[name] != "" || u.present[name]:
			add(&query, name, []byte(qs[name]), true)
		}
	}
	s := "pkcs11:" + strings.Join(path, ";")
	if len(query) > 0 {
		s += "?" + strings.Join(query, "&")
	}
	return s
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// String returns the URI in canonical form with a pin-value replaced by
// REDACTED.
func (u URI) String() string { return u.encode(false) }

// GoString is String: %#v does not print the PIN either.
func (u URI) GoString() string { return u.String() }

// Format makes every verb print String.
func (u URI) Format(f fmt.State, verb rune) { _, _ = io.WriteString(f, u.String()) }

// unused returns an error naming the attributes of u that are not among
// used, or nil.
func (u URI) unused(used ...string) error {
	var extra []string
	for name := range u.present {
		if !slices.Contains(used, name) {
			extra = append(extra, name)
		}
	}
	for name := range u.Vendor {
		if !slices.Contains(used, name) {
			extra = append(extra, name)
		}
	}
	if len(extra) == 0 {
		return nil
	}
	slices.Sort(extra)
	return uriErr("attributes not understood here: %s", strings.Join(extra, ", "))
}

// tokenAttrs are the attributes Config understands besides the object's.
var tokenAttrs = []string{"token", "manufacturer", "serial", "model", "library-manufacturer",
	"library-version", "library-description", "slot-description", "slot-manufacturer", "slot-id",
	"pin-source", "pin-value", "module-name", "module-path", "x-init-reserved"}

var objectAttrs = []string{"object", "type", "id"}

// Config returns the Config the URI describes: the module (module-path),
// the token (serial, else token label, else slot-id), the PIN (pin-value,
// or pin-source: a file, as file:/path or /path, whose first line is the
// PIN) and the module's initialization string (x-init-reserved, as p11-kit
// names it, for Config.InitArgs). Other settings come from base. The remaining token, slot and library
// attributes are checked by OpenURI after the token is found.
func (u URI) Config(base Config) (Config, error) {
	if err := u.unused(append(tokenAttrs, objectAttrs...)...); err != nil {
		return Config{}, err
	}
	c := base
	c.TokenLabel, c.TokenSerial, c.SlotNumber = "", "", nil
	if v, ok := u.Vendor["x-init-reserved"]; ok {
		c.InitArgs = v // p11-kit's name for CK_C_INITIALIZE_ARGS.pReserved
	}
	switch {
	case u.ModulePath != "":
		c.Path = u.ModulePath
	case u.ModuleName != "":
		return Config{}, uriErr("module-name=%s: name the module by module-path", u.ModuleName)
	case c.Path == "":
		return Config{}, uriErr("no module-path")
	}
	switch {
	case u.Serial != "":
		c.TokenSerial = u.Serial
	case u.Token != "":
		c.TokenLabel = u.Token
	case u.SlotID != nil:
		if *u.SlotID > uint64(int(^uint(0)>>1)) {
			return Config{}, uriErr("slot-id %d out of range", *u.SlotID)
		}
		n := int(*u.SlotID)
		c.SlotNumber = &n
	default:
		return Config{}, uriErr("no token selector: give serial, token or slot-id")
	}
	switch {
	case u.present["pin-value"]:
		c.PIN = u.PINValue
	case u.PINSource != "":
		pin, err := readPIN(u.PINSource)
		if err != nil {
			return Config{}, err
		}
		c.PIN = pin
	}
	return c, nil
}

// maxPINFile is the largest pin-source file read: a PIN is short.
const maxPINFile = 1024

// readPIN reads the first line of the file a pin-source names, without a
// leading byte-order mark or a trailing carriage return. The file must be a
// regular file of at most maxPINFile bytes: a FIFO would block, a device
// would hand out bytes that cost a PIN attempt each. stepkms has a reader
// of its own, for step's dialect; internal/pintest holds the cases both
// must pass.
func readPIN(src string) (string, error) {
	path, _ := strings.CutPrefix(src, "file:")
	if !strings.HasPrefix(path, "/") {
		return "", uriErr("pin-source %q: only file:/path or /path is supported", src)
	}
	// O_NONBLOCK: opening a FIFO without a writer would block.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return "", uriErr("pin-source: %v", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", uriErr("pin-source: %v", err)
	}
	switch {
	case !fi.Mode().IsRegular():
		return "", uriErr("pin-source %s is not a regular file but %s", path, fileKind(fi.Mode()))
	case fi.Size() > maxPINFile:
		return "", uriErr("pin-source %s has %d bytes; a PIN file has at most %d", path, fi.Size(), maxPINFile)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPINFile+1))
	if err != nil {
		return "", uriErr("pin-source: %v", err)
	}
	if len(b) > maxPINFile {
		return "", uriErr("pin-source %s has more than %d bytes; a PIN file has at most %d", path, maxPINFile, maxPINFile)
	}
	b = bytes.TrimPrefix(b, []byte("\ufeff")) // the byte-order mark some editors write
	line, _, _ := bytes.Cut(b, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) == 0 {
		return "", uriErr("pin-source %s is empty", path)
	}
	if err := checkPIN(string(line)); err != nil {
		return "", uriErr("pin-source %s: %v", path, err)
	}
	return string(line), nil
}

// fileKind names the type of a file that is not a regular file.
func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "a FIFO"
	case m&os.ModeCharDevice != 0:
		return "a character device"
	case m&os.ModeDevice != 0:
		return "a block device"
	case m.IsDir():
		return "a directory"
	case m&os.ModeSocket != 0:
		return "a socket"
	}
	return "a special file"
}

// KeyRef returns the private key the URI names: object is CKA_LABEL, id is
// CKA_ID; type, if given, must be private.
func (u URI) KeyRef() (KeyRef, error) {
	if err := u.unused(append(tokenAttrs, objectAttrs...)...); err != nil {
		return KeyRef{}, err
	}
	if u.Type != "" && u.Type != "private" {
		return KeyRef{}, uriErr("type=%s names a %s object, not a private key", u.Type, u.Type)
	}
	if u.Object == "" && len(u.ID) == 0 {
		return KeyRef{}, uriErr("no object or id to select a key")
	}
	return KeyRef{ID: u.ID, Label: u.Object}, nil
}

// KeyRefFromURI parses uri and returns the private key it names.
func KeyRefFromURI(uri string) (KeyRef, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return KeyRef{}, err
	}
	return u.KeyRef()
}

// OpenURI opens the module and token a PKCS#11 URI names; the other fields
// of Config (MaxSessions, Logger, ...) come from base, whose module, token
// selector and PIN the URI replaces (base.Path is used when the URI has no
// module-path). Token, slot and library
// attributes beyond the selector (a label next to a serial, manufacturer,
// model, library-*, slot-*) must match what the module reports, or OpenURI
// fails. Object attributes are ignored here: pass the same URI to
// KeyRefFromURI.
func OpenURI(uri string, base Config) (*Provider, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	cfg, err := u.Config(base)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	p, err := Open(cfg)
	if err != nil {
		return nil, err
	}
	if err := p.matchURI(u); err != nil {
		_ = p.Close()
		return nil, err
	}
	return p, nil
}

// matchURI checks the token, slot and library attributes of u against the
// current generation. Its calls go through run like a probe's: they take a
// session slot.
func (p *Provider) matchURI(u *URI) error {
	const op = "open"
	gen, _ := p.gate.load()
	var mismatch []string
	check := func(name, want, got string) {
		if u.present[name] && want != got {
			mismatch = append(mismatch, fmt.Sprintf("%s is %q, not %q", name, got, want))
		}
	}
	err := p.run(gen, newRefusals(op, gen), p.cfg.SessionWaitTimeout, runOwn, func(in *instance, _ pkcs11.SessionHandle) error {
		check("token", u.Token, in.token.Label)
		check("serial", u.Serial, in.token.SerialNumber)
		check("manufacturer", u.Manufacturer, in.token.ManufacturerID)
		check("model", u.Model, in.token.Model)
		if u.present["slot-description"] || u.present["slot-manufacturer"] {
			si, err := in.ctx.GetSlotInfo(in.slot)
			if err != nil {
				return err
			}
			check("slot-description", u.SlotDescription, si.SlotDescription)
			check("slot-manufacturer", u.SlotManufacturer, si.ManufacturerID)
		}
		if u.present["library-manufacturer"] || u.present["library-description"] || u.present["library-version"] {
			info, err := in.ctx.GetInfo()
			if err != nil {
				return err
			}
			check("library-manufacturer", u.LibraryManufacturer, info.ManufacturerID)
			check("library-description", u.LibraryDescription, info.LibraryDescription)
			if u.present["library-version"] {
				check("library-version", u.LibraryVersion, versionString(info.LibraryVersion, u.LibraryVersion))
			}
		}
		if u.SlotID != nil && (u.Serial != "" || u.Token != "") && uint64(in.slot) != *u.SlotID {
			mismatch = append(mismatch, fmt.Sprintf("slot-id is %d, not %d", in.slot, *u.SlotID))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(mismatch) > 0 {
		return &Error{Op: op, Generation: gen, Err: wrapf(ErrTokenNotFound, "%s", strings.Join(mismatch, "; "))}
	}
	return nil
}

// versionString formats v as the URI wrote it: "M" or "M.N".
func versionString(v pkcs11.Version, like string) string {
	if !strings.Contains(like, ".") {
		return strconv.Itoa(int(v.Major))
	}
	return fmt.Sprintf("%d.%d", v.Major, v.Minor)
}
