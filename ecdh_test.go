package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdh"
	"crypto/hpke"
	"crypto/rand"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// kxCurves are the curves of key agreement, with KeySpec's type for each.
var kxCurves = []struct {
	typ   KeyType
	curve ecdh.Curve
	size  int
}{{ECDSAP256, ecdh.P256(), 32}, {ECDSAP384, ecdh.P384(), 48}, {ECDSAP521, ecdh.P521(), 66}}

// newKX makes a key-agreement key of typ on p and looks it up.
func newKX(t testing.TB, p *Provider, typ KeyType, label string) *KeyExchanger {
	t.Helper()
	if _, err := p.GenerateKey(KeySpec{Type: typ, Label: label, Derive: true}); err != nil {
		t.Fatalf("GenerateKey(%v, Derive): %v", typ, err)
	}
	x, err := p.KeyExchanger(KeyRef{Label: label})
	if err != nil {
		t.Fatalf("KeyExchanger(%q): %v", label, err)
	}
	return x
}

// TestKeyExchanger: a key made with KeySpec.Derive agrees keys and does
// nothing else (CKA_DERIVE on, CKA_SIGN off, read back from the token),
// its ECDH equals crypto/ecdh's for 200 random peers on each curve, and a
// peer on another curve, or nil, is refused without a PKCS#11 call.
func TestKeyExchanger(t *testing.T) {
	tok := softhsmtest.NewToken(t, "kx")
	p := openToken(t, tok)
	for _, c := range kxCurves {
		t.Run(c.typ.String(), func(t *testing.T) {
			x := newKX(t, p, c.typ, "kx-"+c.typ.String())
			if x.Curve() != c.curve || x.PublicKey() == nil || !x.PublicKey().Equal(ecdhOf(x.Public())) {
				t.Fatalf("Curve %v, PublicKey %v: not the key's", x.Curve(), x.PublicKey())
			}
			if !strings.HasPrefix(x.String(), "hsm.KeyExchanger{ECDSA P-") {
				t.Errorf("String() = %q", x.String())
			}
			// Least privilege, read from the token.
			vals := readAttrs(t, p, x.k.handle, pkcs11.CKA_DERIVE, pkcs11.CKA_SIGN, pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE)
			if !isTrue(vals[0]) || isTrue(vals[1]) || !isTrue(vals[2]) || isTrue(vals[3]) {
				t.Errorf("private half: CKA_DERIVE %x, CKA_SIGN %x, CKA_SENSITIVE %x, CKA_EXTRACTABLE %x; want derive only, sensitive, not extractable", vals[0], vals[1], vals[2], vals[3])
			}
			if _, err := p.Signer(x.KeyRef()); !errors.Is(err, ErrUnsupportedKey) {
				t.Errorf("Signer of a key-agreement key: %v, want ErrUnsupportedKey", err)
			}
			for i := range 200 {
				peer, err := c.curve.GenerateKey(rand.Reader)
				if err != nil {
					t.Fatal(err)
				}
				got, err := x.ECDH(peer.PublicKey())
				if err != nil {
					t.Fatalf("peer %d: %v", i, err)
				}
				want, err := peer.ECDH(x.PublicKey())
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) || len(got) != c.size {
					t.Fatalf("peer %d: ECDH = %x, crypto/ecdh says %x", i, got, want)
				}
			}
			// Refusals without a call.
			other := ecdh.P256()
			if c.curve == other {
				other = ecdh.P384()
			}
			peer, _ := other.GenerateKey(rand.Reader)
			before := p.Stats().Operations
			_, err := x.ECDH(peer.PublicKey())
			if e := wantErr(t, err, ErrInvalidOptions); e.Op != "ecdh" || !strings.Contains(err.Error(), "another curve") && !strings.Contains(err.Error(), "is on") {
				t.Errorf("peer on %v: %v", other, err)
			}
			_, err = x.ECDHContext(t.Context(), nil)
			wantErr(t, err, ErrInvalidOptions)
			if _, err := x.ECDH(nil); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("nil peer: %v", err)
			}
			if n := p.Stats().Operations - before; n != 0 {
				t.Errorf("refusals made %d operations, want none", n)
			}
		})
	}
	// Stats: agreements count as "derive".
	if h := p.Stats().Latency["derive"]; h.Count < 600 {
		t.Errorf("Stats.Latency[\"derive\"].Count = %d, want at least 600", h.Count)
	}
	// A signing key without CKA_DERIVE, RSA, a bad spec.
	if _, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "kx-sign"}); err != nil {
		t.Fatal(err)
	}
	if _, err := p.KeyExchanger(KeyRef{Label: "kx-sign"}); !errors.Is(err, ErrUnsupportedKey) || !strings.Contains(err.Error(), "CKA_DERIVE") {
		t.Errorf("a key without CKA_DERIVE: %v", err)
	}
	if _, err := p.GenerateKey(KeySpec{Type: RSA2048, Label: "kx-rsa", Derive: true}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("KeySpec{RSA2048, Derive}: %v, want ErrInvalidOptions", err)
	}
	var zero *KeyExchanger
	if _, err := zero.ECDH(nil); !errors.Is(err, ErrKeyNotFound) {
		t.Errorf("nil KeyExchanger: %v", err)
	}
}

// TestDeriveAndSign: KeySpec.DeriveAndSign makes a key that agrees keys
// and signs.
func TestDeriveAndSign(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "kxsign"))
	s, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "both", DeriveAndSign: true})
	if err != nil {
		t.Fatal(err)
	}
	sig, err := s.Sign(nil, digest32[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(s.Public(), digest32[:], sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	x, err := p.KeyExchanger(s.KeyRef())
	if err != nil {
		t.Fatal(err)
	}
	peer, _ := ecdh.P256().GenerateKey(rand.Reader)
	got, err := x.ECDH(peer.PublicKey())
	want, _ := peer.ECDH(x.PublicKey())
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("ECDH: %x, %v; want %x", got, err, want)
	}
}

// TestKeyExchangerHPKE: HPKE (RFC 9180, crypto/hpke) with the recipient's
// key in the HSM: what hpke.Seal made for its public key, hpke.Open with
// hpke.NewDHKEMPrivateKey of the key opens, for each curve and each kind.
func TestKeyExchangerHPKE(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "hpke"))
	for _, c := range kxCurves {
		x := newKX(t, p, c.typ, "hpke-"+c.typ.String())
		d, err := p.DurableKeyExchanger(x.KeyRef())
		if err != nil {
			t.Fatal(err)
		}
		for _, kx := range []ecdh.KeyExchanger{x, d} {
			priv, err := hpke.NewDHKEMPrivateKey(kx)
			if err != nil {
				t.Fatal(err)
			}
			msg := []byte("to the key in the HSM, " + c.typ.String())
			ct, err := hpke.Seal(priv.PublicKey(), hpke.HKDFSHA256(), hpke.AES128GCM(), []byte("info"), msg)
			if err != nil {
				t.Fatal(err)
			}
			pt, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES128GCM(), []byte("info"), ct)
			if err != nil || !bytes.Equal(pt, msg) {
				t.Fatalf("%T %v: Open = %q, %v", kx, c.typ, pt, err)
			}
			ct[len(ct)-1] ^= 1
			if _, err := hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES128GCM(), []byte("info"), ct); err == nil {
				t.Fatalf("%T %v: a tampered ciphertext opened", kx, c.typ)
			}
		}
	}
}

// rfc5903 are the test vectors of RFC 5903 section 8: the initiator's
// private key i and public key g^i, the responder's public key g^r, and
// the shared secret, the x-coordinate of g^ir.
var rfc5903 = []struct {
	curve          ecdh.Curve
	typ            KeyType
	i, gix, giy    string
	grx, gry, girx string
	section        string
}{
	{ecdh.P256(), ECDSAP256,
		"C88F01F5 10D9AC3F 70A292DA A2316DE5 44E9AAB8 AFE84049 C62A9C57 862D1433",
		"DAD0B653 94221CF9 B051E1FE CA5787D0 98DFE637 FC90B9EF 945D0C37 72581180",
		"5271A046 1CDB8252 D61F1C45 6FA3E59A B1F45B33 ACCF5F58 389E0577 B8990BB3",
		"D12DFB52 89C8D4F8 1208B702 70398C34 2296970A 0BCCB74C 736FC755 4494BF63",
		"56FBF3CA 366CC23E 8157854C 13C58D6A AC23F046 ADA30F83 53E74F33 039872AB",
		"D6840F6B 42F6EDAF D13116E0 E1256520 2FEF8E9E CE7DCE03 812464D0 4B9442DE",
		"8.1"},
	{ecdh.P384(), ECDSAP384,
		"099F3C70 34D4A2C6 99884D73 A375A67F 7624EF7C 6B3C0F16 0647B674 14DCE655 E35B5380 41E649EE 3FAEF896 783AB194",
		"667842D7 D180AC2C DE6F74F3 7551F557 55C7645C 20EF73E3 1634FE72 B4C55EE6 DE3AC808 ACB4BDB4 C88732AE E95F41AA",
		"9482ED1F C0EEB9CA FC498462 5CCFC23F 65032149 E0E144AD A0241815 35A0F38E EB9FCFF3 C2C947DA E69B4C63 4573A81C",
		"E558DBEF 53EECDE3 D3FCCFC1 AEA08A89 A987475D 12FD950D 83CFA417 32BC509D 0D1AC43A 0336DEF9 6FDA41D0 774A3571",
		"DCFBEC7A ACF31964 72169E83 8430367F 66EEBE3C 6E70C416 DD5F0C68 759DD1FF F83FA401 42209DFF 5EAAD96D B9E6386C",
		"11187331 C279962D 93D60424 3FD592CB 9D0A926F 422E4718 7521287E 7156C5C4 D6031355 69B9E9D0 9CF5D4A2 70F59746",
		"8.2"},
	{ecdh.P521(), ECDSAP521,
		"0037ADE9 319A89F4 DABDB3EF 411AACCC A5123C61 ACAB57B5 393DCE47 608172A0 95AA85A3 0FE1C295 2C6771D9 37BA9777 F5957B26 39BAB072 462F68C2 7A57382D 4A52",
		"0015417E 84DBF28C 0AD3C278 713349DC 7DF153C8 97A1891B D98BAB43 57C9ECBE E1E3BF42 E00B8E38 0AEAE57C 2D107564 94188594 2AF5A7F4 601723C4 195D176C ED3E",
		"017CAE20 B6641D2E EB695786 D8C94614 6239D099 E18E1D5A 514C739D 7CB4A10A D8A78801 5AC405D7 799DC75E 7B7D5B6C F2261A6A 7F150743 8BF01BEB 6CA3926F 9582",
		"00D0B397 5AC4B799 F5BEA16D 5E13E9AF 971D5E9B 984C9F39 728B5E57 39735A21 9B97C356 436ADC6E 95BB0352 F6BE64A6 C2912D4E F2D0433C ED2B6171 640012D9 460F",
		"015C6822 6383956E 3BD066E7 97B623C2 7CE0EAC2 F551A10C 2C724D98 52077B87 220B6536 C5C408A1 D2AEBB8E 86D678AE 49CB5709 1F473229 6579AB44 FCD17F0F C56A",
		"01144C7D 79AE6956 BC8EDB8E 7C787C45 21CB086F A64407F9 7894E5E6 B2D79B04 D1427E73 CA4BAA24 0A347868 59810C06 B3C715A3 A8CC3151 F2BEE417 996D19F3 DDEA",
		"8.3"},
}

func rfcHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.Join(strings.Fields(s), ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestECDHVectors: the private keys of RFC 5903 section 8, put on the
// token with C_CreateObject (CKA_DERIVE), agree with the responder's public
// key on the published shared secret.
func TestECDHVectors(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "rfc5903"))
	for n, v := range rfc5903 {
		t.Run("RFC 5903 section "+v.section, func(t *testing.T) {
			priv, err := v.curve.NewPrivateKey(rfcHex(t, v.i))
			if err != nil {
				t.Fatal(err)
			}
			gi := append(append([]byte{4}, rfcHex(t, v.gix)...), rfcHex(t, v.giy)...)
			if !bytes.Equal(priv.PublicKey().Bytes(), gi) {
				t.Fatalf("g^i of the vector is not the private key's: the vector was copied wrong")
			}
			ref := KeyRef{ID: []byte{0x59, byte(n)}, Label: "rfc5903-" + v.section}
			createPrivate(t, p, priv, ref, true)
			createPublic(t, p, priv.PublicKey(), ref)
			x, err := p.KeyExchanger(ref)
			if err != nil {
				t.Fatal(err)
			}
			gr, err := v.curve.NewPublicKey(append(append([]byte{4}, rfcHex(t, v.grx)...), rfcHex(t, v.gry)...))
			if err != nil {
				t.Fatal(err)
			}
			got, err := x.ECDH(gr)
			if err != nil {
				t.Fatal(err)
			}
			if want := rfcHex(t, v.girx); !bytes.Equal(got, want) {
				t.Fatalf("ECDH = %x, RFC 5903 says %x", got, want)
			}
		})
	}
}

// curveParams is CKA_EC_PARAMS of curve.
func curveParams(curve ecdh.Curve) []byte {
	switch curve {
	case ecdh.P384():
		return p384Params
	case ecdh.P521():
		return p521Params
	}
	return p256Params
}

// createPrivate puts priv on p's token as a private key object under ref,
// with CKA_DERIVE (and CKA_SIGN with sign).
func createPrivate(t testing.TB, p *Provider, priv *ecdh.PrivateKey, ref KeyRef, derive bool) {
	t.Helper()
	createObject(t, p, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, derive),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, curveParams(priv.Curve())),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, priv.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label),
	})
}

// createPublic puts pub on p's token as a public key object under ref.
func createPublic(t testing.TB, p *Provider, pub *ecdh.PublicKey, ref KeyRef) {
	t.Helper()
	point, err := asn1.Marshal(pub.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	createObject(t, p, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, curveParams(pub.Curve())),
		pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, point),
		pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label),
	})
}

func createObject(t testing.TB, p *Provider, tmpl []*pkcs11.Attribute) {
	t.Helper()
	err := p.withWriteSession("create object", func(in *instance, s pkcs11.SessionHandle) error {
		_, err := in.ctx.CreateObject(s, tmpl)
		return err
	})
	if err != nil {
		t.Fatalf("C_CreateObject: %v", err)
	}
}

// destroyPrivate destroys the private key object under ref.
func destroyPrivate(t testing.TB, p *Provider, ref KeyRef) {
	t.Helper()
	err := p.withWriteSession("destroy object", func(in *instance, s pkcs11.SessionHandle) error {
		h, err := in.findOne(s, "destroy object", refTemplate(pkcs11.CKO_PRIVATE_KEY, ref.ID, ref.Label), "private key", ref)
		if err != nil {
			return err
		}
		return in.ctx.DestroyObject(s, h)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// readAttrs reads attributes of object h.
func readAttrs(t testing.TB, p *Provider, h pkcs11.ObjectHandle, types ...uint) [][]byte {
	t.Helper()
	var vals [][]byte
	err := p.withSession("read", func(in *instance, s pkcs11.SessionHandle) (err error) {
		vals, err = in.slowAttrs(s, h, types)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return vals
}

// secretObjects counts the secret key objects p's session sees.
func secretObjects(t testing.TB, p *Provider) int {
	t.Helper()
	n := 0
	err := p.withSession("count", func(in *instance, s pkcs11.SessionHandle) error {
		h, err := in.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY)}, 1000)
		n = len(h)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestECDHLeavesNoSecret: no derived secret is left on the session after
// an agreement, whether it succeeded, the token refused the peer's point
// (C_DeriveKey failed), or the read of the secret failed after the
// derivation (deriveHook). The provider has one session, which every
// agreement and count shares: a secret left behind would be counted.
func TestECDHLeavesNoSecret(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "leak"), func(c *Config) { c.MaxSessions = 1 })
	x := newKX(t, p, ECDSAP256, "leak")
	if n := secretObjects(t, p); n != 0 {
		t.Fatalf("%d secret objects before any agreement", n)
	}
	peer, _ := ecdh.P256().GenerateKey(rand.Reader)
	for range 10 {
		if _, err := x.ECDH(peer.PublicKey()); err != nil {
			t.Fatal(err)
		}
	}
	if n := secretObjects(t, p); n != 0 {
		t.Errorf("%d secret objects left after 10 agreements", n)
	}

	// A point of the right length that is not on the curve: crypto/ecdh
	// cannot make one, the token refuses it.
	bad := append([]byte{4}, bytes.Repeat([]byte{0xaa}, 64)...)
	if _, err := ecdh.P256().NewPublicKey(bad); err == nil {
		t.Fatal("the bad point is on the curve")
	}
	_, err := x.k.derive(bad, 32)
	if err == nil {
		t.Fatal("the token derived a secret with a point not on the curve")
	}
	t.Logf("a point not on the curve: %v", err)
	waitState(t, p, StateHealthy, waitLimit)
	if n := secretObjects(t, p); n != 0 {
		t.Errorf("%d secret objects left after the token refused the point", n)
	}

	// The derivation succeeded, the read failed.
	injected := errors.New("injected failure after C_DeriveKey")
	hook := func() error { return injected }
	deriveHook.Store(&hook)
	_, err = x.ECDH(peer.PublicKey())
	deriveHook.Store(nil)
	if !errors.Is(err, injected) {
		t.Fatalf("with the read failing: %v", err)
	}
	if n := secretObjects(t, p); n != 0 {
		t.Errorf("%d secret objects left after the read failed", n)
	}
	// And the session goes on.
	if _, err := x.ECDH(peer.PublicKey()); err != nil {
		t.Fatal(err)
	}
	if n := secretObjects(t, p); n != 0 {
		t.Errorf("%d secret objects left at the end", n)
	}
}

// TestKeyExchangerStale: after a re-initialization a KeyExchanger fails
// with ErrStaleKey without a PKCS#11 call; a DurableKeyExchanger finds its
// key again and agrees, and ECDHContext of a KeyExchanger waits, then is
// stale.
func TestKeyExchangerStale(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "kxstale"))
	x := newKX(t, p, ECDSAP384, "stale")
	d, err := p.DurableKeyExchanger(x.KeyRef())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(d.String(), "hsm.DurableKeyExchanger{") || d.Generation() != x.Generation() || d.Curve() != ecdh.P384() {
		t.Errorf("%v, generation %d", d, d.Generation())
	}
	if err := p.Reinitialize(context.Background()); err != nil {
		t.Fatal(err)
	}
	peer, _ := ecdh.P384().GenerateKey(rand.Reader)
	ops := p.Stats().Operations
	if _, err := x.ECDH(peer.PublicKey()); !errors.Is(err, ErrStaleKey) {
		t.Fatalf("stale KeyExchanger: %v", err)
	}
	if _, err := x.ECDHContext(t.Context(), peer.PublicKey()); !errors.Is(err, ErrStaleKey) {
		t.Fatalf("stale KeyExchanger, ECDHContext: %v", err)
	}
	if n := p.Stats().Operations - ops; n != 0 {
		t.Errorf("a stale key made %d operations", n)
	}
	want, _ := peer.ECDH(d.PublicKey())
	for _, f := range []func() ([]byte, error){
		func() ([]byte, error) { return d.ECDH(peer.PublicKey()) },
		func() ([]byte, error) { return d.ECDHContext(t.Context(), peer.PublicKey()) },
	} {
		got, err := f()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("durable after the re-initialization: %x, %v; want %x", got, err, want)
		}
	}
	if d.Generation() != p.Generation() {
		t.Errorf("durable bound in generation %d, provider at %d", d.Generation(), p.Generation())
	}
}

// TestKeyExchangerProof: a derive-only key whose private object is not its
// public object's key is refused at lookup (ErrKeyMismatch), and by a
// durable key in the next generation (ErrKeyChanged): the proof is an
// agreement with an ephemeral key, checked with crypto/ecdh.
func TestKeyExchangerProof(t *testing.T) {
	p := openToken(t, softhsmtest.NewToken(t, "kxproof"))
	a, _ := ecdh.P256().GenerateKey(rand.Reader)
	b, _ := ecdh.P256().GenerateKey(rand.Reader)
	mismatched := KeyRef{ID: []byte{0x61}, Label: "mismatched"}
	createPrivate(t, p, b, mismatched, true)
	createPublic(t, p, a.PublicKey(), mismatched)
	if _, err := p.KeyExchanger(mismatched); !errors.Is(err, ErrKeyMismatch) {
		t.Fatalf("a mismatched pair: %v, want ErrKeyMismatch", err)
	}

	ref := KeyRef{ID: []byte{0x62}, Label: "swapped"}
	createPrivate(t, p, a, ref, true)
	createPublic(t, p, a.PublicKey(), ref)
	d, err := p.DurableKeyExchanger(ref)
	if err != nil {
		t.Fatal(err)
	}
	// Another private key under the reference; the public object stays.
	destroyPrivate(t, p, ref)
	createPrivate(t, p, b, ref, true)
	if err := p.Reinitialize(context.Background()); err != nil {
		t.Fatal(err)
	}
	peer, _ := ecdh.P256().GenerateKey(rand.Reader)
	if out, err := d.ECDH(peer.PublicKey()); !errors.Is(err, ErrKeyChanged) || out != nil {
		t.Fatalf("a swapped private key: %x, %v; want ErrKeyChanged", out, err)
	}
}

// TestGroupKeyExchanger: a group's key agrees on its members, and on the
// other when the key is gone from one. The members are two tokens of
// SoftHSM, one module (p11-kit 0.24's RPC does not carry
// CKM_ECDH1_DERIVE: docs/modules.md).
func TestGroupKeyExchanger(t *testing.T) {
	priv, _ := ecdh.P521().GenerateKey(rand.Reader)
	ref := KeyRef{ID: []byte{0x63}, Label: "group-kx"}
	var cfgs []Config
	for i := range 2 {
		tok := softhsmtest.NewToken(t, fmt.Sprintf("gkx%d", i))
		cfgs = append(cfgs, Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 2})
	}
	g := openGroup(t, GroupConfig{Members: cfgs})
	for _, m := range g.Members() {
		createPrivate(t, m, priv, ref, true)
		createPublic(t, m, priv.PublicKey(), ref)
	}
	x, err := g.KeyExchanger(ref)
	if err != nil {
		t.Fatal(err)
	}
	if !x.PublicKey().Equal(priv.PublicKey()) || x.Curve() != ecdh.P521() || !strings.HasPrefix(x.String(), "hsm.GroupKeyExchanger{") {
		t.Fatalf("%v: not the key", x)
	}
	agree := func(what string) {
		t.Helper()
		peer, _ := ecdh.P521().GenerateKey(rand.Reader)
		want, _ := peer.ECDH(priv.PublicKey())
		got, err := x.ECDHContext(t.Context(), peer.PublicKey())
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %x, %v; want %x", what, got, err, want)
		}
	}
	for i := range 4 {
		agree(fmt.Sprintf("both members, agreement %d", i))
	}
	for i, m := range g.Members() {
		if n := m.Stats().Latency["derive"].Count; n == 0 {
			t.Errorf("member %d made no agreement: the group did not spread them", i)
		}
	}
	destroyPrivate(t, g.Members()[0], ref)
	for i := range 4 {
		agree(fmt.Sprintf("the key gone from member 0, agreement %d", i))
	}
	if _, err := x.ECDH(nil); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("nil peer: %v", err)
	}
}

// TestCallsPerECDH counts, with pkcs11-spy between hsm and SoftHSM, the
// PKCS#11 calls of one agreement once the session is open and the key
// found: 3 (C_DeriveKey, C_GetAttributeValue into a buffer of known size,
// C_DestroyObject). Raw miekg/pkcs11 makes 4 (its C_GetAttributeValue
// asks for the length first): compare's BenchmarkECDH.
func TestCallsPerECDH(t *testing.T) {
	useSpy(t)
	tok := softhsmtest.NewToken(t, "kxspy")
	p, err := Open(Config{Path: spyModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	x := newKX(t, p, ECDSAP256, "spy")
	peer, _ := ecdh.P256().GenerateKey(rand.Reader)
	if _, err := x.ECDH(peer.PublicKey()); err != nil {
		t.Fatal(err)
	}
	const n = 20
	calls := callsByName(t, func() {
		for range n {
			if _, err := x.ECDH(peer.PublicKey()); err != nil {
				t.Fatal(err)
			}
		}
	})
	per := float64(total(calls)) / n
	t.Logf("PKCS#11 calls per ECDH: %.2f %v", per, calls)
	if per != 3 || calls["C_DeriveKey"] != n || calls["C_DestroyObject"] != n {
		t.Errorf("hsm makes %.2f calls per ECDH (%v), want 3: C_DeriveKey, C_GetAttributeValue, C_DestroyObject", per, calls)
	}
}
