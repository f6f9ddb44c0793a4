package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	cryptorand "crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// PKCS#11 3.0 constants that miekg/pkcs11 v1.1.2 does not define.
const (
	ckkECEdwards = 0x40   // CKK_EC_EDWARDS
	ckmEdDSA     = 0x1057 // CKM_EDDSA
)

// KeyRef selects a private key on the token by CKA_ID, CKA_LABEL or both.
// Exactly one private key must match.
type KeyRef struct {
	ID    []byte
	Label string
}

// String describes the reference, e.g. `label "tls" id 0102`.
func (r KeyRef) String() string {
	switch {
	case len(r.ID) > 0 && r.Label != "":
		return fmt.Sprintf("label %q id %s", r.Label, hex.EncodeToString(r.ID))
	case len(r.ID) > 0:
		return "id " + hex.EncodeToString(r.ID)
	case r.Label != "":
		return fmt.Sprintf("label %q", r.Label)
	}
	return "empty key reference"
}

type keyKind int

const (
	kindRSA keyKind = iota + 1
	kindECDSA
	kindEd25519
)

func (k keyKind) String() string {
	switch k {
	case kindRSA:
		return "RSA"
	case kindECDSA:
		return "ECDSA"
	case kindEd25519:
		return "Ed25519"
	}
	return "unknown"
}

// key is a private key found in one generation. Its handle is used only
// after the gate admitted an operation of gen, which guarantees that the
// library is still the instance the handle came from.
type key struct {
	p      *Provider
	in     *instance
	gen    uint64
	handle pkcs11.ObjectHandle
	ref    KeyRef // the key's own CKA_ID and CKA_LABEL
	kind   keyKind
	pub    crypto.PublicKey
	// size is the signature size for ECDSA (2 × the order's byte length)
	// and Ed25519, the modulus length in bytes for RSA.
	size       int
	canSign    bool
	canDecrypt bool
	// canDerive: CKA_DERIVE, the key agrees keys (ECDH; ecdh.go).
	canDerive bool
	// alwaysAuth: CKA_ALWAYS_AUTHENTICATE; each operation needs a
	// C_Login(CKU_CONTEXT_SPECIFIC) after its init.
	alwaysAuth bool
	// pubFromPriv: pub was read from the private key object itself (an RSA
	// key's CKA_MODULUS), so it is the private key's own.
	pubFromPriv bool
	// proven: the private key signed (or decrypted) a challenge under pub
	// when the key was looked up, or the token refused every challenge
	// mechanism for it (prove.go). Written before the key is shared.
	proven bool
	// mechs is what is known of the signing mechanisms the key may use
	// (CKA_ALLOWED_MECHANISMS, refusals; message.go). Shared with the
	// key's copies.
	mechs *signMechs

	signRefusals, decryptRefusals, deriveRefusals *refusals
}

// lookup finds the private key ref in the current generation.
func (p *Provider) lookup(ref KeyRef) (*key, error) {
	const op = "find key"
	if len(ref.ID) == 0 && ref.Label == "" {
		return nil, opErr(op, p.Generation(), ErrKeyNotFound, "empty KeyRef: set ID, Label or both")
	}
	for tries := 0; ; tries++ {
		k, err := p.lookupOnce(ref)
		if !errors.Is(err, ErrStaleKey) {
			return k, err
		}
		// Re-initialized between the find and the proof: a lookup never
		// reports ErrStaleKey; it looks again in the new generation.
		if tries == maxRebinds {
			return nil, &Error{Op: op, Generation: p.Generation(), Err: wrapf(ErrUnavailable, "re-initialized %d times in a row during the lookup", tries+1)}
		}
	}
}

// lookupOnce is lookup in the generation current when it starts.
func (p *Provider) lookupOnce(ref KeyRef) (*key, error) {
	const op = "find key"
	var k *key
	err := p.withSession(op, func(in *instance, s pkcs11.SessionHandle) (err error) {
		k, err = in.find(s, ref)
		return err
	})
	if err != nil {
		return nil, err
	}
	k = p.adopt(k)
	if k.needsProof() {
		err := k.check(k.pub, func() error {
			return opErr(op, k.gen, ErrKeyMismatch, "%s: a signature of a random challenge does not verify under its public key object: the pair is refused", k.ref)
		})
		if err != nil {
			return nil, err
		}
		k.proven = true
	}
	return k, nil
}

// adopt makes k, found in an operation of p, a key of p: its refusals are
// built once, here.
func (p *Provider) adopt(k *key) *key {
	k.p = p
	k.signRefusals = newRefusals("sign", k.gen)
	k.decryptRefusals = newRefusals("decrypt", k.gen)
	k.deriveRefusals = newDeriveRefusals(k.gen)
	return k
}

// withSession runs f through run, on a read-only session of the current
// generation.
func (p *Provider) withSession(op string, f task) error {
	return p.current(op, runOp, f)
}

// current runs f through run as an operation of the current generation.
// Refused as stale, which happens only when a re-initialization came
// between reading the generation and entering it (f did not run), it is
// tried again in the new one, at most maxRebinds times: an operation of the
// current generation never reports ErrStaleKey.
func (p *Provider) current(op string, kind runKind, f task) error {
	for tries := 0; ; tries++ {
		gen, _ := p.gate.load()
		err := p.run(gen, newRefusals(op, gen), p.cfg.SessionWaitTimeout, kind, f)
		if !errors.Is(err, ErrStaleKey) {
			return err
		}
		if tries == maxRebinds {
			return &Error{Op: op, Generation: p.Generation(), Err: wrapf(ErrUnavailable, "re-initialized %d times in a row before the operation could start", tries+1)}
		}
	}
}

// withWriteSession runs f through run, on a read-write session of the
// current generation.
func (p *Provider) withWriteSession(op string, f task) error {
	return p.current(op, runWrite, f)
}

// findObjects returns up to max+1 handles matching tmpl, so that callers can
// tell "exactly max" from "more".
func (in *instance) findObjects(s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := in.ctx.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	objs, _, err := in.ctx.FindObjects(s, max+1)
	if ferr := in.ctx.FindObjectsFinal(s); ferr != nil {
		// The search may still be active on the session.
		if err == nil {
			err = ferr
		}
		return nil, mayBeActive(err)
	}
	return objs, err
}

// findOne returns the one object tmpl finds: ErrKeyNotFound when none does,
// ErrAmbiguousKey when several do. what and ref name it in the errors.
func (in *instance) findOne(s pkcs11.SessionHandle, op string, tmpl []*pkcs11.Attribute, what string, ref KeyRef) (pkcs11.ObjectHandle, error) {
	handles, err := in.findObjects(s, tmpl, 1)
	if err != nil {
		return 0, err
	}
	switch len(handles) {
	case 0:
		return 0, opErr(op, in.gen, ErrKeyNotFound, "no %s with %s", what, ref)
	case 1:
		return handles[0], nil
	}
	return 0, opErr(op, in.gen, ErrAmbiguousKey, "several %ss with %s", what, ref)
}

// refTemplate is the search template for objects with CKA_ID id and
// CKA_LABEL label (each when set), of class when it is not 0 (CKO_DATA,
// which no lookup searches for).
func refTemplate(class uint, id []byte, label string) []*pkcs11.Attribute {
	var t []*pkcs11.Attribute
	if class != 0 {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_CLASS, class))
	}
	if len(id) > 0 {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_ID, id))
	}
	if label != "" {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	return t
}

// ulong decodes a CK_ULONG attribute value (native byte order and size).
func ulong(b []byte) uint {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b))
	case 4:
		return uint(binary.NativeEndian.Uint32(b))
	}
	return 0
}

var (
	oidP256    = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384    = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
	oidP521    = asn1.ObjectIdentifier{1, 3, 132, 0, 35}
	oidEd25519 = asn1.ObjectIdentifier{1, 3, 101, 112}
)

func (k *key) setECPublic(pub crypto.PublicKey) error {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if k.kind != kindECDSA {
			break
		}
		k.pub = pub
		k.size = 2 * ((pub.Curve.Params().N.BitLen() + 7) / 8)
		return nil
	case ed25519.PublicKey:
		if k.kind != kindEd25519 {
			break
		}
		k.pub = pub
		k.size = ed25519.SignatureSize
		return nil
	}
	return opErr("find key", k.gen, ErrUnsupportedKey, "%s: public key of type %T does not fit a %v private key", k.ref, pub, k.kind)
}

// certPublic returns the public key of the certificate with k's CKA_ID.
func (in *instance) certPublic(s pkcs11.SessionHandle, k *key) (crypto.PublicKey, error) {
	if len(k.ref.ID) == 0 {
		return nil, errors.New("no CKA_ID")
	}
	objs, err := in.findObjects(s, refTemplate(pkcs11.CKO_CERTIFICATE, k.ref.ID, ""), 1)
	if err != nil {
		return nil, err
	}
	if len(objs) != 1 {
		return nil, errors.New("no unique certificate")
	}
	attrs, err := in.ctx.GetAttributeValue(s, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(attrs[0].Value)
	if err != nil {
		return nil, err
	}
	if err := in.proves(s, k, cert.PublicKey); err != nil {
		return nil, err
	}
	k.proven = true
	return cert.PublicKey, nil
}

// proves checks that the private key k signs for pub: a signature of a
// random challenge, made on session s, verifies under pub. A certificate
// found by CKA_ID alone could be another key's.
func (in *instance) proves(s pkcs11.SessionHandle, k *key, pub crypto.PublicKey) error {
	const op = "find key"
	refuse := func(why string) error {
		return opErr(op, in.gen, ErrKeyNotFound, "%s has no public key object, and the certificate with its CKA_ID %s", k.ref, why)
	}
	if !k.canSign {
		return refuse("cannot be checked: the key does not sign")
	}
	challenge := make([]byte, 32)
	if _, err := cryptorand.Read(challenge); err != nil {
		return err
	}
	mech, digest := mechECDSA, challenge
	switch {
	case k.kind == kindEd25519:
		mech = mechEdDSA
	case !k.mechs.rawAllowed(schemeECDSA) && k.mechs.allows(pkcs11.CKM_ECDSA_SHA256):
		// Restricted to hash-and-sign (message.go): the challenge is the
		// message.
		mech = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA_SHA256, nil)}
		sum := sha256.Sum256(challenge)
		digest = sum[:]
	}
	if err := in.ctx.SignInit(s, mech, k.handle); err != nil {
		return err
	}
	sig, err := in.ctx.Sign(s, challenge)
	if err != nil {
		return mayBeActive(err)
	}
	ok := false
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if k.kind == kindECDSA && len(sig)%2 == 0 {
			r, sv := new(big.Int).SetBytes(sig[:len(sig)/2]), new(big.Int).SetBytes(sig[len(sig)/2:])
			ok = ecdsa.Verify(pub, digest, r, sv)
		}
	case ed25519.PublicKey:
		ok = k.kind == kindEd25519 && ed25519.Verify(pub, challenge, sig)
	}
	if !ok {
		return refuse("is for another key")
	}
	return nil
}

func curveOf(params []byte) (elliptic.Curve, error) {
	var oid asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(params, &oid); err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("EC parameters %x are not a named curve", params)
	}
	switch {
	case oid.Equal(oidP256):
		return elliptic.P256(), nil
	case oid.Equal(oidP384):
		return elliptic.P384(), nil
	case oid.Equal(oidP521):
		return elliptic.P521(), nil
	}
	return nil, fmt.Errorf("curve %v is not supported (P-256, P-384, P-521 are)", oid)
}

// isEd25519Params accepts the two encodings of PKCS#11 3.0: the RFC 8410
// OID and the PrintableString "edwards25519" (what SoftHSM writes).
func isEd25519Params(params []byte) bool {
	var oid asn1.ObjectIdentifier
	if rest, err := asn1.Unmarshal(params, &oid); err == nil && len(rest) == 0 {
		return oid.Equal(oidEd25519)
	}
	var name string
	if rest, err := asn1.Unmarshal(params, &name); err == nil && len(rest) == 0 {
		return name == "edwards25519"
	}
	return false
}

// ecPoint unwraps CKA_EC_POINT, which the standard says is a DER OCTET
// STRING but some tokens return raw. A value of the raw length is raw.
func ecPoint(v []byte, rawLen int) []byte {
	if len(v) == rawLen {
		return v
	}
	var inner []byte
	if rest, err := asn1.Unmarshal(v, &inner); err == nil && len(rest) == 0 {
		return inner
	}
	return v
}
