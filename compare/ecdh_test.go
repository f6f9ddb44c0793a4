package compare_test

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"testing"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// ecdhKey makes, once, a P-256 key-agreement key "kx" on the bench token.
func ecdhKey(t testing.TB, tok *softhsmtest.Token) {
	t.Helper()
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.KeyExchanger(hsm.KeyRef{Label: "kx"}); err == nil {
		return
	}
	if _, err := p.GenerateKey(hsm.KeySpec{Type: hsm.ECDSAP256, Label: "kx", Derive: true}); err != nil {
		t.Fatal(err)
	}
}

// rawECDH is one agreement with bare miekg/pkcs11, as an application
// writes it: C_DeriveKey into a session object, C_GetAttributeValue (two
// calls: miekg/pkcs11 asks for the length first), C_DestroyObject.
func rawECDH(r *rawP11, key pkcs11.ObjectHandle, peer []byte) ([]byte, error) {
	s := r.session()
	defer r.put(s)
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, pkcs11.NewECDH1DeriveParams(pkcs11.CKD_NULL, nil, peer))}
	h, err := r.ctx.DeriveKey(s, mech, key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
	})
	if err != nil {
		return nil, err
	}
	attrs, err := r.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if derr := r.ctx.DestroyObject(s, h); err == nil {
		err = derr
	}
	if err != nil {
		return nil, err
	}
	return attrs[0].Value, nil
}

// BenchmarkECDH: one P-256 agreement (CKM_ECDH1_DERIVE), raw
// miekg/pkcs11 and hsm's KeyExchanger, directly on SoftHSM. crypto11
// v1.6.2 has no ECDH.
func BenchmarkECDH(b *testing.B) {
	tok := benchToken(b)
	ecdhKey(b, tok)
	peer, _ := ecdh.P256().GenerateKey(rand.Reader)
	for _, eng := range []string{"raw", "hsm"} {
		b.Run("eng="+eng, func(b *testing.B) {
			var op func() ([]byte, error)
			switch eng {
			case "raw":
				r := openRaw(b, softhsmtest.SoftHSMModule, tok)
				defer r.close()
				key := r.privateKey("kx")
				op = func() ([]byte, error) { return rawECDH(r, key, peer.PublicKey().Bytes()) }
			case "hsm":
				p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
				if err != nil {
					b.Fatal(err)
				}
				defer p.Close()
				x, err := p.KeyExchanger(hsm.KeyRef{Label: "kx"})
				if err != nil {
					b.Fatal(err)
				}
				op = func() ([]byte, error) { return x.ECDH(peer.PublicKey()) }
			}
			first, err := op() // warm up
			if err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				out, err := op()
				if err != nil || !bytes.Equal(out, first) {
					b.Fatalf("%x, %v", out, err)
				}
			}
		})
	}
}
