package stepkms

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm"
)

// TestKeyNameRoundTrip checks that the names SearchKeys makes read back as
// the same key, whatever the ID and label hold.
func TestKeyNameRoundTrip(t *testing.T) {
	for _, ref := range []hsm.KeyRef{
		{ID: []byte{0x73, 0x31}, Label: "root-key"},
		{ID: []byte{0}, Label: ""},
		{ID: nil, Label: "a label; with = & ? + % / signs"},
		{ID: []byte("not hex"), Label: "ünïcödé"},
		{ID: []byte{0xff, 0x00, 0x3b}, Label: "pin-value=x"},
	} {
		name := keyName(ref)
		id, label, _, err := object(name)
		if err != nil {
			t.Errorf("%+v: %s: %v", ref, name, err)
			continue
		}
		if !bytes.Equal(id, ref.ID) || label != ref.Label {
			t.Errorf("%+v: %s reads back as id %x label %q", ref, name, id, label)
		}
	}
}

// FuzzURI feeds the URI parsers anything: no panic, and an error never
// shows a pin-value.
func FuzzURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=smallstep?pin-value=password",
		"pkcs11:serial=1a2b3c4d5e6f?pin-value=password",
		"pkcs11:slot-id=5;max-sessions=10?pin-value=password",
		"pkcs11:id=7331;object=name",
		"pkcs11:id=%0a%10;serial=0x01",
		"pkcs11:token=a;token=b",
		"pkcs11:token=%zz",
		"pkcs11://x",
		"pkcs11:",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if strings.Contains(raw, "pin-prompt") || strings.Contains(raw, "pin-source") || strings.Contains(raw, "module-path") {
			return // a terminal, a file, a library: not for a fuzzer
		}
		raw += "&pin-value=SECRET-PIN"
		if strings.Contains(raw[:len(raw)-len("&pin-value=SECRET-PIN")], "SECRET-PIN") {
			return
		}
		check := func(err error) {
			if err != nil && strings.Contains(err.Error(), "SECRET-PIN") {
				t.Fatalf("%q: the error shows the PIN: %v", raw, err)
			}
		}
		_, err := config(raw, "", hsm.Config{Path: "/nonexistent"})
		check(err)
		_, _, u, err := object(raw)
		check(err)
		if u != nil {
			_, err = certSerial(u, raw)
			check(err)
		}
		if strings.Contains(redact(raw), "SECRET-PIN") {
			t.Fatalf("%q: redact shows the PIN: %s", raw, redact(raw))
		}
	})
}
