package hsm

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func u64(n uint64) *uint64 { return &n }

// The examples of RFC 7512, section 3, and what they decode to.
func TestParseURIExamples(t *testing.T) {
	tests := []struct {
		uri  string
		want URI
	}{
		{"pkcs11:", URI{}},
		{"pkcs11:object=my-pubkey;type=public", URI{Object: "my-pubkey", Type: "public"}},
		{"pkcs11:object=my-key;type=private?pin-source=file:/etc/token", URI{Object: "my-key", Type: "private", PINSource: "file:/etc/token"}},
		{"pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BE%2D%A9%EA%C2%33%A4%8D%71%D5%E0%AA%5A%D4%3C;serial=?pin-source=file:/etc/token_pin",
			URI{Token: "The Software PKCS#11 Softtoken", Manufacturer: "Snake Oil, Inc.", Model: "1.0", Object: "my-certificate", Type: "cert",
				ID:        []byte{0x69, 0x95, 0x3E, 0x5C, 0xF4, 0xBE, 0x2D, 0xA9, 0xEA, 0xC2, 0x33, 0xA4, 0x8D, 0x71, 0xD5, 0xE0, 0xAA, 0x5A, 0xD4, 0x3C},
				PINSource: "file:/etc/token_pin"}},
		{"pkcs11:object=my-sign-key;type=private?module-name=mypkcs11", URI{Object: "my-sign-key", Type: "private", ModuleName: "mypkcs11"}},
		{"pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1", URI{Object: "my-sign-key", Type: "private", ModulePath: "/mnt/libmypkcs11.so.1"}},
		{"pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.?pin-value=the-pin",
			URI{Token: "Software PKCS#11 softtoken", Manufacturer: "Snake Oil, Inc.", PINValue: "the-pin"}},
		{"pkcs11:slot-description=Sun%20Metaslot", URI{SlotDescription: "Sun Metaslot"}},
		{"pkcs11:library-manufacturer=Snake%20Oil,%20Inc.;library-description=Soft%20Token%20Library;library-version=1.23",
			URI{LibraryManufacturer: "Snake Oil, Inc.", LibraryDescription: "Soft Token Library", LibraryVersion: "1.23"}},
		{"pkcs11:token=My%20token%25%20created%20by%20Joe;library-version=3;id=%01%02%03%Ba%dd%Ef%fe%ed;object=my-certificate;type=cert",
			URI{Token: "My token% created by Joe", LibraryVersion: "3", ID: []byte{1, 2, 3, 0xBA, 0xDD, 0xEF, 0xFE, 0xED}, Object: "my-certificate", Type: "cert"}},
		{"pkcs11:token=A%20name%20with%20a%20substring%20%25%3B;object=my-certificate;type=public",
			URI{Token: "A name with a substring %;", Object: "my-certificate", Type: "public"}},
		{"pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-certificate;type=cert",
			URI{Token: "Name with a small A with acute: á", Object: "my-certificate", Type: "cert"}},
		{"pkcs11:token=my-token;object=my-certificate;type=cert;vendor-aaa=value-a?pin-source=file:/etc/token_pin&vendor-bbb=value-b",
			URI{Token: "my-token", Object: "my-certificate", Type: "cert", PINSource: "file:/etc/token_pin", Vendor: map[string]string{"vendor-aaa": "value-a", "vendor-bbb": "value-b"}}},
		// And the issue's own.
		{"pkcs11:token=prod;object=tls;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin",
			URI{Token: "prod", Object: "tls", Type: "private", ModulePath: "/usr/lib/softhsm/libsofthsm2.so", PINSource: "file:/run/pin"}},
		{"PKCS11:slot-id=42;id=%01%02", URI{SlotID: u64(42), ID: []byte{1, 2}}},
	}
	for _, tt := range tests {
		t.Run(tt.uri, func(t *testing.T) {
			u, err := ParseURI(tt.uri)
			if err != nil {
				t.Fatal(err)
			}
			got := *u
			got.present = nil
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got  %#v\nwant %#v", fields(got), fields(tt.want))
			}
			// Canonical form parses back to the same.
			again, err := ParseURI(u.encode(true))
			if err != nil {
				t.Fatalf("re-parse %s: %v", u.encode(true), err)
			}
			again.present = nil
			if !reflect.DeepEqual(*again, got) {
				t.Fatalf("round trip through %s changed it", u.encode(true))
			}
		})
	}
}

// fields prints a URI's fields, PIN included, for test failures only.
func fields(u URI) string {
	type plain URI
	return fmt.Sprintf("%+v", plain(u))
}

func TestParseURIErrors(t *testing.T) {
	for _, bad := range []string{
		"", "pkcs11", "http://x", "pkcs12:token=a",
		"pkcs11:token=a;token=b",            // twice
		"pkcs11:token",                      // no '='
		"pkcs11:=x",                         // empty name
		"pkcs11:token=a b",                  // space must be encoded
		"pkcs11:token=a/b",                  // '/' not allowed in the path
		"pkcs11:id=%0",                      // truncated
		"pkcs11:id=%zz",                     // not hex
		"pkcs11:token=%",                    // truncated
		"pkcs11:type=secret",                // unknown type
		"pkcs11:slot-id=-1",                 // not a number
		"pkcs11:slot-id=1a",                 // not a number
		"pkcs11:library-version=1.",         // bad version
		"pkcs11:library-version=v1",         // bad version
		"pkcs11:pin-value=1234",             // query attribute in the path
		"pkcs11:?token=a",                   // path attribute in the query
		"pkcs11:?pin-value=1&pin-source=/x", // both PINs
		"pkcs11:?pin-value=1&pin-value=2",   // twice
		"pkcs11:to ken=a",                   // bad name
		"pkcs11:x-v=1;x-v=2",                // vendor twice
	} {
		if u, err := ParseURI(bad); err == nil {
			t.Errorf("ParseURI(%q) = %v, want an error", bad, u)
		} else if !errors.Is(err, ErrURI) || !strings.HasPrefix(err.Error(), "hsm: ") {
			t.Errorf("ParseURI(%q): %v does not match ErrURI", bad, err)
		}
	}
}

func TestURIRedactsPIN(t *testing.T) {
	u, err := ParseURI("pkcs11:token=t?pin-value=s3cr3t%21")
	if err != nil {
		t.Fatal(err)
	}
	if u.PINValue != "s3cr3t!" {
		t.Fatalf("PIN %q", u.PINValue)
	}
	for _, f := range []string{"%v", "%+v", "%#v", "%s", "%q"} {
		for _, v := range []any{u, *u} {
			if out := fmt.Sprintf(f, v); strings.Contains(out, "s3cr3t") {
				t.Errorf("%s prints the PIN: %s", f, out)
			}
		}
	}
	if u.String() != "pkcs11:token=t?pin-value=REDACTED" {
		t.Errorf("String() = %s", u.String())
	}
}

func TestURIKeyRef(t *testing.T) {
	ref, err := KeyRefFromURI("pkcs11:token=t;object=tls;id=%01%02;type=private")
	if err != nil || ref.Label != "tls" || !bytes.Equal(ref.ID, []byte{1, 2}) {
		t.Fatalf("%v %v", ref, err)
	}
	for _, bad := range []string{
		"pkcs11:token=t",               // nothing selects a key
		"pkcs11:object=tls;type=cert",  // not a private key
		"pkcs11:object=tls;x-vendor=1", // not understood
		"pkcs11:object=tls;tokn=typo",  // a typo is not silently ignored
	} {
		if _, err := KeyRefFromURI(bad); !errors.Is(err, ErrURI) {
			t.Errorf("KeyRefFromURI(%q): %v, want ErrURI", bad, err)
		}
	}
}

func FuzzParseURI(f *testing.F) {
	f.Add("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;object=my-key;type=private;id=%01%02?pin-value=1234&module-path=/lib/x.so")
	f.Add("pkcs11:slot-id=3;library-version=1.23;x-v=%ff?pin-source=file:/run/pin")
	f.Add("pkcs11:")
	f.Add("pkcs11:%")
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if u != nil {
				t.Fatal("URI returned with an error")
			}
			return
		}
		enc := u.encode(true)
		again, err := ParseURI(enc)
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", enc, s, err)
		}
		if again.encode(true) != enc {
			t.Fatalf("canonical form not stable: %q -> %q", enc, again.encode(true))
		}
		if u.PINValue != "" && strings.Contains(u.String(), escape([]byte(u.PINValue), true)) && len(u.PINValue) > 8 {
			t.Fatalf("String() shows the PIN")
		}
		_, _ = u.KeyRef()
		u.PINSource = "" // no file reads while fuzzing
		_, _ = u.Config(Config{})
	})
}

func TestOpenURI(t *testing.T) {
	tok := sharedToken(t)
	pinFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pinFile, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := "pkcs11:token=" + escape([]byte(tok.Label), false) + ";object=p256;type=private?module-path=" + softhsmtest.SoftHSMModule
	for _, uri := range []string{
		base + "&pin-source=file:" + pinFile,
		base + "&pin-source=" + pinFile,
		base + "&pin-value=" + tok.PIN,
		"pkcs11:serial=" + tok.Serial + ";token=" + escape([]byte(tok.Label), false) + ";manufacturer=SoftHSM%20project;model=SoftHSM%20v2;library-manufacturer=SoftHSM;id=%02?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN,
	} {
		p, err := OpenURI(uri, Config{MaxSessions: 4})
		if err != nil {
			t.Fatalf("OpenURI(%s): %v", uri, err)
		}
		ref, err := KeyRefFromURI(uri)
		if err != nil {
			t.Fatal(err)
		}
		s, err := p.Signer(ref)
		if err != nil {
			t.Fatal(err)
		}
		d := sha256.Sum256(nil)
		if _, err := s.Sign(nil, d[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	big := filepath.Join(dir, "big")
	nul := filepath.Join(dir, "nul")
	if err := os.WriteFile(big, bytes.Repeat([]byte("1"), 1025), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(nul, []byte(tok.PIN+"\x00\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A byte-order mark before the PIN (some editors write one) is not
	// part of it.
	bom := filepath.Join(dir, "bom")
	if err := os.WriteFile(bom, []byte("\ufeff"+tok.PIN+"\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if p, err := OpenURI(base+"&pin-source="+bom, Config{}); err != nil {
		t.Fatalf("pin-source with a byte-order mark: %v", err)
	} else {
		p.Close()
	}
	for _, tt := range []struct{ uri, says string }{
		{"pkcs11:token=" + escape([]byte(tok.Label), false) + ";manufacturer=Other?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN, `manufacturer is "SoftHSM project", not "Other"`},
		{"pkcs11:serial=" + tok.Serial + ";token=wrong?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN, `token is`},
		{base + "&pin-source=/nonexistent/pin", "pin-source"},
		{base + "&pin-source=env:PIN", "only file:"},
		// Hostile pin-sources: refused before any read that could block or
		// any login attempt.
		{base + "&pin-source=/dev/zero", "not a regular file but a character device"},
		{base + "&pin-source=/dev/urandom", "not a regular file but a character device"},
		{base + "&pin-source=" + fifo, "not a regular file but a FIFO"},
		{base + "&pin-source=" + dir, "not a regular file but a directory"},
		{base + "&pin-source=" + big, "has 1025 bytes; a PIN file has at most 1024"},
		{base + "&pin-source=" + nul, "control character U+0000"},
		{base + "&pin-value=12%0034", "control character U+0000"},
		{base + "&pin-value=%FF%FE", "not valid UTF-8"},
		{"pkcs11:token=x?module-name=softhsm2&pin-value=1", "module-path"},
		{"pkcs11:object=k?module-path=/x.so&pin-value=1", "no token selector"},
	} {
		p, err := OpenURI(tt.uri, Config{})
		if err == nil {
			p.Close()
			t.Fatalf("OpenURI(%s) succeeded", tt.uri)
		}
		if !strings.Contains(err.Error(), tt.says) || strings.Contains(err.Error(), tok.PIN+"&") {
			t.Errorf("OpenURI(%s): %v; want it to say %q", tt.uri, err, tt.says)
		}
	}
	// The module is free again after every failure.
	openShared(t)
}
