package main

import (
	"net/url"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// conformChecks are the checks conform makes on a token that can do
// everything (without -all).
var conformChecks = []string{
	"open", "module info", "token info", "list keys",
	"generate RSA-2048", "sign RSA-2048 PKCS#1 v1.5 SHA-256", "sign RSA-2048 PSS SHA-256 salt=hash", "sign RSA-2048 PSS SHA-256 salt=auto",
	"generate ECDSA P-256", "sign ECDSA P-256 SHA-256",
	"generate ECDSA P-384", "sign ECDSA P-384 SHA-384",
	"generate ECDSA P-521", "sign ECDSA P-521 SHA-512",
	"generate Ed25519", "sign Ed25519 pure",
	"generate RSA-2048 (decrypt)", "decrypter",
	"decrypt PKCS#1 v1.5", "decrypt PKCS#1 v1.5 SessionKeyLen 32", "decrypt OAEP SHA-1", "decrypt OAEP SHA-256", "decrypt OAEP SHA-256 label", "decrypt OAEP SHA-256 label ending in NUL",
	"generate ECDSA P-256 (derive)", "ecdh ECDSA P-256", "generate ECDSA P-384 (derive)", "ecdh ECDSA P-384", "generate ECDSA P-521 (derive)", "ecdh ECDSA P-521",
	"certificate create", "certificate import", "certificate read", "certificate delete",
	"random", "reinitialize", "stale signer", "durable signer",
	"TLS 1.3 handshake", "URI lookup", "delete keys",
}

// conformRows parses conform's table: the result of each check.
func conformRows(t *testing.T, out string) map[string]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) < 2 || !strings.HasPrefix(lines[0], "check ") {
		t.Fatalf("no table:\n%s", out)
	}
	col := strings.Index(lines[0], "result")
	rows := map[string]string{}
	for _, l := range lines[1:] {
		if len(l) < col {
			t.Fatalf("short line %q in\n%s", l, out)
		}
		check := strings.TrimSpace(l[:col])
		result, _, _ := strings.Cut(l[col:], " ")
		if _, dup := rows[check]; dup {
			t.Errorf("check %q twice in\n%s", check, out)
		}
		rows[check] = result
	}
	return rows
}

func TestConformSoftHSM(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck-conform")
	uri := "pkcs11:token=" + tok.Label + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN
	code, out, errs := hsmcheck(t, "conform", "-uri", uri)
	t.Logf("\n%s", out)
	if code != 0 || errs != "" {
		t.Errorf("exit %d, stderr: %s", code, errs)
	}
	rows := conformRows(t, out)
	for _, check := range conformChecks {
		if got, ok := rows[check]; !ok {
			t.Errorf("no check %q", check)
		} else if got != resOK {
			t.Errorf("%s: %s, want ok", check, got)
		}
	}
	if len(rows) != len(conformChecks) {
		t.Errorf("%d checks, want %d", len(rows), len(conformChecks))
	}
	if strings.Contains(out, tok.PIN) {
		t.Error("conform printed the PIN")
	}
	// The keys are gone; a second run replaces what -keep left.
	expect(t, 0, []string{"private keys: 0"}, nil, "list", "-uri", uri)
	expect(t, 0, []string{"kept (-keep)"}, nil, "conform", "-uri", uri, "-keep")
	expect(t, 0, []string{conformPrefix + "p256", "private keys: 9", "derive"}, nil, "list", "-uri", uri)
	expect(t, 0, []string{"replaced an earlier key", "9 keys and their public halves"}, nil, "conform", "-uri", uri)
	expect(t, 0, []string{"private keys: 0"}, nil, "list", "-uri", uri)

	// A wrong PIN fails at open; usage errors exit 2.
	out = expect(t, 1, []string{"open "}, []string{"hsmcheck conform: ", "CKR_PIN_INCORRECT"}, "conform", "-uri", strings.Replace(uri, tok.PIN, "0000", 1))
	if rows := conformRows(t, out); rows["open"] != resFail {
		t.Errorf("open with a wrong PIN: %q", rows["open"])
	}
	expect(t, 2, nil, []string{"hsmcheck conform: -uri is required"}, "conform")
	expect(t, 2, nil, []string{"unexpected argument"}, "conform", "-uri", uri, "extra")
}

// TestConformNSS runs conform against NSS softokn, which opens only with
// x-init-reserved and needs no login.
func TestConformNSS(t *testing.T) {
	args := softhsmtest.NSSDatabase(t)
	uri := "pkcs11:token=NSS%20Certificate%20DB?module-path=" + softhsmtest.Softokn + "&x-init-reserved=" + url.PathEscape(args)
	expect(t, 1, nil, []string{"hsmcheck conform: ", "give -nologin"}, "conform", "-uri", uri)
	code, out, errs := hsmcheck(t, "conform", "-uri", uri, "-nologin")
	t.Logf("\n%s", out)
	if code != 0 || errs != "" {
		t.Errorf("exit %d, stderr: %s", code, errs)
	}
	rows := conformRows(t, out)
	for check, result := range rows {
		switch result {
		case resOK:
		case resRefused:
			t.Logf("NSS refused: %s", check)
		default:
			t.Errorf("%s: %s", check, result)
		}
	}
	for _, check := range []string{"open", "generate ECDSA P-256", "reinitialize", "durable signer", "TLS 1.3 handshake", "URI lookup", "delete keys"} {
		if rows[check] != resOK {
			t.Errorf("%s: %q, want ok", check, rows[check])
		}
	}
}
