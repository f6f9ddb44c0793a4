package stepkms

import (
	"context"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"

	// Step's own pkcs11 backend, which registers itself in its init: Register
	// must replace it.
	_ "go.step.sm/crypto/kms/pkcs11"
)

// TestRegister opens the KMS the way step-ca does, through kms.New, with
// step's own pkcs11 backend linked in: after Register, every pkcs11 KMS is
// this package's.
func TestRegister(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	Register()
	uri := kmsURI(softhsmtest.SoftHSMModule, tok, "")
	for i, opts := range []apiv1.Options{
		{Type: apiv1.PKCS11, URI: uri},
		{Type: "PKCS11", URI: uri},
		{URI: uri}, // the type from the URI's scheme
	} {
		km, err := kms.New(context.Background(), opts)
		if err != nil {
			t.Fatal(err)
		}
		k, ok := km.(*KMS)
		if !ok {
			km.Close()
			t.Fatalf("kms.New(%q) made a %T, not a *stepkms.KMS", opts.Type, km)
		}
		if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=0" + string(rune('a'+i)) + ";object=k" + string(rune('a'+i))}); err != nil {
			t.Error(err)
		}
		if err := km.Close(); err != nil {
			t.Fatal(err)
		}
	}
	// An error gives a nil interface, not a typed nil.
	fn, ok := apiv1.LoadKeyManagerNewFunc(apiv1.PKCS11)
	if !ok {
		t.Fatal("no pkcs11 KMS registered")
	}
	if km, err := fn(context.Background(), apiv1.Options{URI: "pkcs11:"}); err == nil || km != nil {
		t.Errorf("bad URI: %#v, %v; want nil and an error", km, err)
	}
}
