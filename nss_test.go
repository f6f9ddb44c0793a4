package hsm

import (
	"context"
	"crypto"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

const softokn = softhsmtest.Softokn

// nssDB is softhsmtest.NSSDatabase.
func nssDB(t *testing.T) string { return softhsmtest.NSSDatabase(t) }

// TestInitArgs: NSS softokn opens only with CK_C_INITIALIZE_ARGS.pReserved,
// given as Config.InitArgs or a URI's x-init-reserved, at Open and at every
// re-initialization.
func TestInitArgs(t *testing.T) {
	args := nssDB(t)
	cfg := Config{Path: softokn, TokenLabel: "NSS Certificate DB", NoLogin: true}
	if p, err := Open(cfg); err == nil {
		p.Close()
		t.Fatal("NSS softokn opened without InitArgs: the test tests nothing")
	} else {
		t.Logf("without InitArgs: %v", err)
	}
	_, err := Open(Config{Path: softokn, TokenLabel: "NSS Certificate DB", NoLogin: true, InitArgs: "a\x00b"})
	wantErr(t, err, ErrConfig)

	cfg.InitArgs = args
	p, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "nss"})
	if err != nil {
		t.Fatal(err)
	}
	// NSS leaves the attributes it read empty when it refuses another in
	// the same C_GetAttributeValue: the lookups learned to ask only for
	// what each object has.
	if !p.inst.Load().strictAttrs.Load() {
		t.Error("the one-call read was trusted on NSS softokn")
	}
	ds, err := p.DurableSigner(s.KeyRef())
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Reinitialize(context.Background()); err != nil { // C_Initialize with the same arguments
		t.Fatal(err)
	}
	d := digest32[:]
	sig, err := ds.Sign(nil, d, crypto.SHA256)
	if err != nil {
		t.Fatalf("after the re-initialization: %v", err)
	}
	if err := verify(ds.Public(), d, sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	// The same through a URI.
	uri := "pkcs11:token=NSS%20Certificate%20DB;object=nss?module-path=" + softokn + "&x-init-reserved=" + escape([]byte(args), true)
	q, err := OpenURI(uri, Config{NoLogin: true})
	if err != nil {
		t.Fatalf("OpenURI: %v", err)
	}
	defer q.Close()
	ref, err := KeyRefFromURI(uri)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Signer(ref); err != nil {
		t.Fatalf("the key made before, through the URI: %v", err)
	}
}
