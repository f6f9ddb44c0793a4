package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

func TestCommands(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	tok.GenerateKey(t, softhsmtest.RSA2048, []byte{2}, "rsa")
	uri := func(pin, object string) string {
		u := "pkcs11:token=" + tok.Label
		if object != "" {
			u += ";object=" + object
		}
		return u + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + pin
	}
	tests := []struct {
		args     []string
		exit     int
		out, err string
	}{
		{[]string{"probe", "-uri", uri(tok.PIN, "")}, 0, `2 private keys`, ""},
		{[]string{"probe", "-uri", uri(tok.PIN, "")}, 0, `label "rsa" id 02                        RSA-2048`, ""},
		{[]string{"sign", "-uri", uri(tok.PIN, "ec")}, 0, "signed and verified", ""},
		{[]string{"sign", "-uri", uri(tok.PIN, ""), "-key", "rsa"}, 0, "RSA-2048", ""},
		{[]string{"bench", "-uri", uri(tok.PIN, "ec"), "-duration", "300ms", "-workers", "2"}, 0, "signatures in", ""},
		{[]string{"probe", "-uri", uri("0000", "")}, 1, "", "CKR_PIN_INCORRECT"},
		{[]string{"probe", "-uri", strings.Replace(uri(tok.PIN, ""), tok.Label, "absent", 1)}, 1, "", `no token with a label "absent"`},
		{[]string{"probe", "-uri", "pkcs11:token=x?module-path=/etc/hostname&pin-value=1"}, 1, "", "could not be loaded as a PKCS#11 module"},
		{[]string{"probe", "-uri", "pkcs11:token=x?module-path=/nonexistent.so&pin-value=1"}, 1, "", "no such file"},
		{[]string{"sign", "-uri", uri(tok.PIN, "")}, 1, "", "no object or id"},
		{[]string{"sign", "-uri", uri(tok.PIN, "missing")}, 1, "", "key not found"},
		{[]string{"probe"}, 2, "", "-uri is required"},
		{[]string{"frobnicate"}, 2, "", "unknown command"},
		{nil, 2, "", "usage:"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		code := run(tt.args, &out, &errb)
		if code != tt.exit || !strings.Contains(out.String(), tt.out) || !strings.Contains(errb.String(), tt.err) {
			t.Errorf("hsmcheck %s: exit %d\nstdout: %s\nstderr: %s\nwant exit %d, stdout with %q, stderr with %q",
				strings.Join(tt.args, " "), code, out.String(), errb.String(), tt.exit, tt.out, tt.err)
		}
		if strings.Contains(out.String()+errb.String(), "pin-value="+tok.PIN) {
			t.Errorf("hsmcheck %s printed the PIN", strings.Join(tt.args, " "))
		}
	}
}
