package hsm

import (
	"bytes"
	"crypto"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"

	"github.com/miekg/pkcs11"
)

// Key and certificate life cycle: generation, deletion, certificates on the
// token, random numbers. Like signing, each is one operation of the current
// generation through run: it fails fast with ErrUnavailable during an
// outage, and a device loss in the middle of it is never retried blindly.
// Writes run on read-write sessions of their own (the pool holds read-only
// sessions), and are refused on a write-protected token.

// KeyType is a type of key GenerateKey makes. Its String is what
// KeyInfo.Type says of such a key.
type KeyType int

// Key types.
const (
	RSA2048 KeyType = iota + 1
	RSA3072
	RSA4096
	ECDSAP256
	ECDSAP384
	ECDSAP521
	Ed25519
)

func (t KeyType) String() string {
	switch t {
	case RSA2048, RSA3072, RSA4096:
		return fmt.Sprintf("RSA-%d", t.rsaBits())
	case ECDSAP256:
		return "ECDSA P-256"
	case ECDSAP384:
		return "ECDSA P-384"
	case ECDSAP521:
		return "ECDSA P-521"
	case Ed25519:
		return "Ed25519"
	}
	return fmt.Sprintf("KeyType(%d)", int(t))
}

func (t KeyType) rsaBits() int {
	switch t {
	case RSA2048:
		return 2048
	case RSA3072:
		return 3072
	case RSA4096:
		return 4096
	}
	return 0
}

// DER of the curves' OIDs, for CKA_EC_PARAMS.
var (
	p256Params = mustDER(oidP256)
	p384Params = mustDER(oidP384)
	p521Params = mustDER(oidP521)
	// Ed25519 as RFC 8410's OID, and as the PrintableString "edwards25519"
	// that PKCS#11 3.0 also allows (SoftHSM 2.6 takes only this one).
	ed25519OID    = mustDER(oidEd25519)
	ed25519String = []byte{0x13, 0x0c, 'e', 'd', 'w', 'a', 'r', 'd', 's', '2', '5', '5', '1', '9'}
)

func mustDER(v any) []byte {
	b, err := asn1.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// Attribute is a PKCS#11 attribute for KeySpec's vendor overrides: Type is
// the CKA_* value; Value is a bool, an int or uint (CK_ULONG), a string, or
// []byte.
type Attribute struct {
	Type  uint
	Value any
}

// KeySpec says what key GenerateKey makes.
type KeySpec struct {
	Type KeyType
	// Label is the CKA_LABEL of both halves. Required.
	Label string
	// ID is the CKA_ID of both halves. Empty means the SHA-1 of the
	// public key's subjectPublicKey bits, like an X.509 subject key
	// identifier, set right after generation (some HSMs, CloudHSM among
	// them, cannot change CKA_ID after generation: give one there).
	ID []byte
	// Decrypt makes an RSA key decrypt too: CKA_DECRYPT on the private half,
	// CKA_ENCRYPT on the public half.
	Decrypt bool
	// Extractable sets CKA_EXTRACTABLE on the private half (default false:
	// the key never leaves the HSM, even wrapped).
	Extractable bool
	// PrivateAttributes and PublicAttributes are added to the templates of
	// the halves, replacing an attribute of the same type, for vendor
	// quirks. Handle with care: CKA_SENSITIVE false or CKA_EXTRACTABLE true
	// here weakens the key.
	PrivateAttributes, PublicAttributes []Attribute
}

// GenerateKey generates a key pair on the token and returns it as a Signer
// of the current generation. The private half is a token object, private,
// sensitive and not extractable (unless spec says so), and signs (and
// decrypts, with spec.Decrypt); the public half verifies (and encrypts).
//
// It refuses a label, or an ID, that a private key already has
// (ErrKeyExists). That makes a retry safe: when the HSM is lost during a
// generation, the key may or may not have been made; after recovery, a
// second GenerateKey with the same label either makes it or fails with
// ErrKeyExists, whose message says to look the key up. Two GenerateKey
// calls of one Provider run one at a time (the second waits up to
// Config.SessionWaitTimeout, then ErrBusy); other processes are not
// excluded.
//
// It blocks for the generation (an RSA-4096 key can take seconds) and up to
// Config.SessionWaitTimeout for a session. Safe for concurrent use.
func (p *Provider) GenerateKey(spec KeySpec) (*Signer, error) {
	const op = "generate key"
	gen := p.Generation()
	mech, pub, priv, err := spec.templates()
	if err != nil {
		return nil, &Error{Op: op, Generation: gen, Err: err}
	}
	// One at a time; the wait is bounded like a session's.
	t := time.NewTimer(p.cfg.SessionWaitTimeout)
	select {
	case p.genSem <- struct{}{}:
		t.Stop()
	case <-t.C:
		return nil, &Error{Op: op, Generation: gen, Err: wrapf(ErrBusy, "another GenerateKey has run for %v", p.cfg.SessionWaitTimeout)}
	}
	defer func() { <-p.genSem }()
	var k *key
	err = p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		// The label must be free among private keys, and the ID among all
		// objects: a public half or a certificate left with it would be
		// taken for the new key's.
		taken := func(tmpl []*pkcs11.Attribute) (bool, error) {
			handles, err := in.findObjects(s, tmpl, 0)
			return len(handles) > 0, err
		}
		if yes, err := taken(refTemplate(pkcs11.CKO_PRIVATE_KEY, nil, spec.Label)); err != nil {
			return err
		} else if yes {
			return opErr(op, in.gen, ErrKeyExists, "a private key with %s is on the token: look it up (Signer, DurableSigner) or delete it", KeyRef{Label: spec.Label})
		}
		if len(spec.ID) > 0 {
			if yes, err := taken(refTemplate(0, spec.ID, "")); err != nil {
				return err
			} else if yes {
				return opErr(op, in.gen, ErrKeyExists, "an object with %s is on the token (a key, a public key or a certificate): look it up (Signer, DurableSigner), or delete what holds the ID", KeyRef{ID: spec.ID})
			}
		}
		var ph, kh pkcs11.ObjectHandle
		in.long(func() {
			ph, kh, err = in.ctx.GenerateKeyPair(s, mech, pub, priv)
			if err != nil && spec.Type == Ed25519 && refusesCurve(err) {
				// The other encoding of the curve PKCS#11 3.0 allows.
				pub = replaceAttr(pub, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, ed25519String))
				ph, kh, err = in.ctx.GenerateKeyPair(s, mech, pub, priv)
			}
		})
		if err != nil {
			return stepErr("C_GenerateKeyPair", err)
		}
		po, err := in.readObject(s, ph)
		if err != nil {
			return err
		}
		ko, err := in.readObject(s, kh)
		if err != nil {
			return err
		}
		if ko.decrypt && !spec.Decrypt {
			// The module's default lets the private half decrypt (SoftHSM
			// for EC keys): turn it off, as asked.
			if err := in.ctx.SetAttributeValue(s, kh, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false)}); err != nil {
				return &Error{Op: op, Generation: in.gen, Err: wrapf(stepErr("C_SetAttributeValue (CKA_DECRYPT false)", err),
					"the module made the private key decrypt and refuses to change it; %s", in.discard(s, spec.Label, ph, kh))}
			}
			ko.decrypt = false
		}
		if len(spec.ID) == 0 {
			// The default ID, from the public key.
			if k, err = in.keyFrom(s, &ko, []object{po}); err != nil {
				return in.unusable(s, spec.Label, ph, kh, err)
			}
			der, err := x509.MarshalPKIXPublicKey(k.pub)
			if err != nil {
				return opErr(op, in.gen, ErrUnsupportedKey, "public key: %v", err)
			}
			id := ski(der)
			for _, h := range []pkcs11.ObjectHandle{kh, ph} {
				if err := in.ctx.SetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, id)}); err != nil {
					// Do not leave a key without its ID (or with it on one
					// half only): delete the pair.
					return &Error{Op: op, Generation: in.gen, Err: wrapf(stepErr("C_SetAttributeValue (CKA_ID)", err),
						"%s; give KeySpec.ID for an HSM that sets CKA_ID only at generation", in.discard(s, spec.Label, ph, kh))}
				}
			}
			ko.id, po.id = id, id
		}
		if k, err = in.keyFrom(s, &ko, []object{po}); err != nil {
			return in.unusable(s, spec.Label, ph, kh, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &Signer{p.adopt(k)}, nil
}

// unusable deletes the key pair GenerateKey made when err says hsm cannot
// use it (ErrUnsupportedKey: a public key it cannot read), so that no key
// without its ID is left behind; other errors are returned as they are.
func (in *instance) unusable(s pkcs11.SessionHandle, label string, pub, priv pkcs11.ObjectHandle, err error) error {
	if !errors.Is(err, ErrUnsupportedKey) {
		return err
	}
	return wrapf(err, "%s", in.discard(s, label, pub, priv))
}

// discard deletes a key pair GenerateKey made and cannot hand out, and
// says what became of it.
func (in *instance) discard(s pkcs11.SessionHandle, label string, pub, priv pkcs11.ObjectHandle) string {
	if err := errors.Join(in.ctx.DestroyObject(s, pub), in.ctx.DestroyObject(s, priv)); err != nil {
		return fmt.Sprintf("deleting the key pair made failed too (%v): delete the key labelled %q", err, label)
	}
	return "the key pair made was deleted"
}

// ski is the SHA-1 of the subjectPublicKey bits of der (a PKIX public key),
// as RFC 5280's method (1) for a subject key identifier.
func ski(der []byte) []byte {
	var spki struct {
		Algorithm        pkix.AlgorithmIdentifier
		SubjectPublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		sum := sha1.Sum(der)
		return sum[:]
	}
	sum := sha1.Sum(spki.SubjectPublicKey.Bytes)
	return sum[:]
}

func refusesCurve(err error) bool {
	code, _ := codeOf(err)
	return code == pkcs11.CKR_CURVE_NOT_SUPPORTED || code == pkcs11.CKR_ATTRIBUTE_VALUE_INVALID || code == pkcs11.CKR_DOMAIN_PARAMS_INVALID || code == pkcs11.CKR_TEMPLATE_INCONSISTENT
}

// templates returns the mechanism and the templates of the public and the
// private half, or why spec is not valid.
func (spec KeySpec) templates() ([]*pkcs11.Mechanism, []*pkcs11.Attribute, []*pkcs11.Attribute, error) {
	switch {
	case spec.Label == "":
		return nil, nil, nil, errOpts("KeySpec.Label is empty: a key needs a label")
	case !utf8.ValidString(spec.Label):
		return nil, nil, nil, errOpts("KeySpec.Label is not valid UTF-8")
	case spec.Decrypt && spec.Type.rsaBits() == 0:
		return nil, nil, nil, errOpts("KeySpec.Decrypt: only RSA keys decrypt, not %v", spec.Type)
	}
	var mech uint
	var keyType uint
	pub := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
	}
	priv := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, spec.Extractable),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
	}
	if len(spec.ID) > 0 {
		pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_ID, spec.ID))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_ID, spec.ID))
	}
	switch spec.Type {
	case RSA2048, RSA3072, RSA4096:
		mech, keyType = pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pkcs11.CKK_RSA
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, spec.Type.rsaBits()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
		if spec.Decrypt {
			// Only when asked: tpm2-pkcs11 refuses a template with
			// CKA_DECRYPT or CKA_ENCRYPT false (GenerateKey turns a
			// module's default of true off after generation instead).
			pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true))
			priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true))
		}
	case ECDSAP256, ECDSAP384, ECDSAP521:
		mech, keyType = pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKK_EC
		params := map[KeyType][]byte{ECDSAP256: p256Params, ECDSAP384: p384Params, ECDSAP521: p521Params}[spec.Type]
		pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	case Ed25519:
		mech, keyType = ckmECEdwardsKeyPairGen, ckkECEdwards
		pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, ed25519OID))
	default:
		return nil, nil, nil, errOpts("KeySpec.Type %v is not one of RSA2048, RSA3072, RSA4096, ECDSAP256, ECDSAP384, ECDSAP521, Ed25519", spec.Type)
	}
	pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType))
	priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType))
	var err error
	if pub, err = override(pub, spec.PublicAttributes, "PublicAttributes"); err != nil {
		return nil, nil, nil, err
	}
	if priv, err = override(priv, spec.PrivateAttributes, "PrivateAttributes"); err != nil {
		return nil, nil, nil, err
	}
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pub, priv, nil
}

// CKM_EC_EDWARDS_KEY_PAIR_GEN (PKCS#11 3.0; miekg/pkcs11 v1.1.2 lacks it).
const ckmECEdwardsKeyPairGen = 0x1055

// override adds attrs to tmpl, each replacing an attribute of its type.
func override(tmpl []*pkcs11.Attribute, attrs []Attribute, field string) ([]*pkcs11.Attribute, error) {
	for _, a := range attrs {
		switch a.Type {
		case pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE, pkcs11.CKA_TOKEN, pkcs11.CKA_LABEL, pkcs11.CKA_ID:
			// The checks and the lookup GenerateKey makes rest on these:
			// set them through KeySpec's fields.
			return nil, errOpts("KeySpec.%s: attribute 0x%x (CKA_CLASS, CKA_KEY_TYPE, CKA_TOKEN, CKA_LABEL, CKA_ID) cannot be overridden; use KeySpec's fields", field, a.Type)
		}
		switch a.Value.(type) {
		case bool, int, uint, string, []byte:
		default:
			return nil, errOpts("KeySpec.%s: attribute 0x%x has a value of type %T; use bool, int, uint, string or []byte", field, a.Type, a.Value)
		}
		if v, ok := a.Value.(int); ok && v < 0 {
			return nil, errOpts("KeySpec.%s: attribute 0x%x is negative", field, a.Type)
		}
		tmpl = replaceAttr(tmpl, pkcs11.NewAttribute(a.Type, a.Value))
	}
	return tmpl, nil
}

func replaceAttr(tmpl []*pkcs11.Attribute, a *pkcs11.Attribute) []*pkcs11.Attribute {
	out := make([]*pkcs11.Attribute, 0, len(tmpl)+1)
	for _, t := range tmpl {
		if t.Type != a.Type {
			out = append(out, t)
		}
	}
	return append(out, a)
}

// writable refuses a write to a write-protected token.
func (in *instance) writable(op string) error {
	if in.token.Flags&pkcs11.CKF_WRITE_PROTECTED != 0 {
		return opErr(op, in.gen, ErrWriteProtected, "token %q (CKF_WRITE_PROTECTED); signing and decryption still work", in.token.Label)
	}
	return nil
}

// write runs f on a read-write session of the current generation, after
// refusing a write-protected token without a call (it would refuse the
// read-write session with CKR_TOKEN_WRITE_PROTECTED).
func (p *Provider) write(op string, f task) error {
	if in := p.inst.Load(); in != nil {
		if err := in.writable(op); err != nil {
			return err
		}
	}
	return p.withWriteSession(op, f)
}

// DeleteKey deletes the private key ref names and its public half (same
// CKA_ID, or same label for a key without one). A certificate with its ID
// stays: DeleteCertificate deletes it. Afterwards Signer(ref) fails with
// ErrKeyNotFound; keys looked up before fail at their next operation.
// Safe for concurrent use.
func (p *Provider) DeleteKey(ref KeyRef) error {
	const op = "delete key"
	if len(ref.ID) == 0 && ref.Label == "" {
		return opErr(op, p.Generation(), ErrKeyNotFound, "empty KeyRef: set ID, Label or both")
	}
	return p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		h, err := in.findOne(s, op, refTemplate(pkcs11.CKO_PRIVATE_KEY, ref.ID, ref.Label), "private key", ref)
		if err != nil {
			return err
		}
		o, err := in.readObject(s, h)
		if err != nil {
			return err
		}
		pubs, err := in.publicHalves(s, &o)
		if err != nil {
			return err
		}
		if len(pubs) > 1 {
			return opErr(op, in.gen, ErrAmbiguousKey, "several public keys could be the public half of %s: nothing deleted", ref)
		}
		// The public half first: a deletion cut short leaves the private
		// key, which a retry finds and deletes, rather than a public key
		// that could be taken for a new key's.
		var victims []pkcs11.ObjectHandle
		for _, p := range pubs {
			victims = append(victims, p.h)
		}
		for _, h := range append(victims, o.h) {
			if err := in.ctx.DestroyObject(s, h); err != nil {
				return stepErr("C_DestroyObject", err)
			}
		}
		return nil
	})
}

// ImportCertificate stores cert on the token as a CKO_CERTIFICATE (X.509)
// with CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER and CKA_VALUE. When a
// private key matches ref, the certificate must be for it (its public key),
// and takes the key's CKA_ID and CKA_LABEL; otherwise (a CA certificate of
// the chain) it takes ref's ID and label. A certificate with that CKA_ID
// (or, without one, that label) already on the token is refused with
// ErrKeyExists. Safe for concurrent use.
func (p *Provider) ImportCertificate(ref KeyRef, cert *x509.Certificate) error {
	const op = "import certificate"
	switch {
	case cert == nil || len(cert.Raw) == 0:
		return opErr(op, p.Generation(), ErrInvalidOptions, "no certificate (nil, or not parsed from DER)")
	case len(ref.ID) == 0 && ref.Label == "":
		return opErr(op, p.Generation(), ErrInvalidOptions, "empty KeyRef: set ID, Label or both")
	}
	k, err := p.lookup(ref)
	switch {
	case err == nil:
		if !samePublic(cert.PublicKey, k.pub) {
			return opErr(op, k.gen, ErrInvalidOptions, "the certificate %q is not for the key %s", cert.Subject, k.ref)
		}
		ref = k.ref
	case !isNotFound(err):
		return err
	default:
		// No usable key: a certificate of the chain, unless a private key
		// is there whose public key cannot be read, which the certificate
		// cannot then be checked against.
		if n, err := p.privateKeys(ref); err != nil {
			return err
		} else if n > 0 {
			return opErr(op, p.Generation(), ErrInvalidOptions, "%s names a private key whose public key cannot be read (no public key object), so the certificate cannot be checked against it", ref)
		}
	}
	serial, err := asn1.Marshal(cert.SerialNumber)
	if err != nil {
		return opErr(op, p.Generation(), ErrInvalidOptions, "serial number: %v", err)
	}
	return p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		existing, err := in.findObjects(s, certTemplate(ref), 0)
		if err != nil {
			return err
		}
		if len(existing) > 0 {
			return opErr(op, in.gen, ErrKeyExists, "a certificate with %s is on the token: delete it first (DeleteCertificate)", certRef(ref))
		}
		tmpl := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE),
			pkcs11.NewAttribute(pkcs11.CKA_CERTIFICATE_TYPE, pkcs11.CKC_X_509),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
			pkcs11.NewAttribute(pkcs11.CKA_SUBJECT, cert.RawSubject),
			pkcs11.NewAttribute(pkcs11.CKA_ISSUER, cert.RawIssuer),
			pkcs11.NewAttribute(pkcs11.CKA_SERIAL_NUMBER, serial),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, cert.Raw),
		}
		if len(ref.ID) > 0 {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, ref.ID))
		}
		if ref.Label != "" {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, ref.Label))
		}
		if _, err := in.ctx.CreateObject(s, tmpl); err != nil {
			return stepErr("C_CreateObject", err)
		}
		return nil
	})
}

func isNotFound(err error) bool { return errors.Is(err, ErrKeyNotFound) }

// samePublic reports whether a and b are the same public key.
func samePublic(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

// privateKeys counts the private keys ref names (0, 1, or 2 for more).
func (p *Provider) privateKeys(ref KeyRef) (int, error) {
	var n int
	err := p.withSession("find key", func(in *instance, s pkcs11.SessionHandle) error {
		handles, err := in.findObjects(s, refTemplate(pkcs11.CKO_PRIVATE_KEY, ref.ID, ref.Label), 1)
		n = len(handles)
		return err
	})
	return n, err
}

// certRef is the reference a certificate of ref is stored and found by:
// its CKA_ID, or its label when it has no ID.
func certRef(ref KeyRef) KeyRef {
	if len(ref.ID) > 0 {
		return KeyRef{ID: ref.ID}
	}
	return KeyRef{Label: ref.Label}
}

func certTemplate(ref KeyRef) []*pkcs11.Attribute {
	r := certRef(ref)
	return refTemplate(pkcs11.CKO_CERTIFICATE, r.ID, r.Label)
}

// Certificate returns the certificate stored for the key ref names: the
// certificate object with the key's CKA_ID (or, when no key matches ref,
// with ref's ID, else its label). Safe for concurrent use.
func (p *Provider) Certificate(ref KeyRef) (*x509.Certificate, error) {
	const op = "find certificate"
	ref, pub, err := p.certificateRef(ref)
	if err != nil {
		return nil, err
	}
	var cert *x509.Certificate
	err = p.withSession(op, func(in *instance, s pkcs11.SessionHandle) error {
		der, err := in.certificateDER(s, op, certTemplate(ref), certRef(ref))
		if err != nil {
			return err
		}
		if cert, err = x509.ParseCertificate(der); err != nil {
			return opErr(op, in.gen, ErrInvalidOptions, "the certificate object with %s does not parse: %v", certRef(ref), err)
		}
		if pub != nil && !samePublic(cert.PublicKey, pub) {
			return opErr(op, in.gen, ErrKeyChanged, "the certificate object with %s (%q) is for another key than %s: delete it (DeleteCertificate)", certRef(ref), cert.Subject, ref)
		}
		return nil
	})
	return cert, err
}

// certificateRef is the key's own reference and public key when a key
// matches ref, else ref and nil.
func (p *Provider) certificateRef(ref KeyRef) (KeyRef, crypto.PublicKey, error) {
	if len(ref.ID) == 0 && ref.Label == "" {
		return ref, nil, opErr("find certificate", p.Generation(), ErrKeyNotFound, "empty KeyRef: set ID, Label or both")
	}
	k, err := p.lookup(ref)
	switch {
	case err == nil:
		return k.ref, k.pub, nil
	case isNotFound(err):
		return ref, nil, nil
	}
	return ref, nil, err
}

// certificateDER reads CKA_VALUE of the one certificate object tmpl finds.
func (in *instance) certificateDER(s pkcs11.SessionHandle, op string, tmpl []*pkcs11.Attribute, ref KeyRef) ([]byte, error) {
	h, err := in.findOne(s, op, tmpl, "certificate object", ref)
	if err != nil {
		return nil, err
	}
	attrs, err := in.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if err != nil {
		return nil, err
	}
	return attrs[0].Value, nil
}

// maxChain bounds the certificates CertificateChain follows.
const maxChain = 10

// CertificateChain returns the certificate of the key ref names (as
// Certificate), then its issuer's, found on the token by CKA_SUBJECT, and
// so on up to a self-signed certificate or one whose issuer is not on the
// token (at most 10). Each certificate's signature is checked against the
// next. Safe for concurrent use.
func (p *Provider) CertificateChain(ref KeyRef) ([]*x509.Certificate, error) {
	const op = "find certificate chain"
	leaf, err := p.Certificate(ref)
	if err != nil {
		return nil, err
	}
	chain := []*x509.Certificate{leaf}
	seen := map[string]bool{string(leaf.Raw): true}
	err = p.withSession(op, func(in *instance, s pkcs11.SessionHandle) error {
		for c := leaf; len(chain) < maxChain && !bytes.Equal(c.RawIssuer, c.RawSubject); {
			objs, err := in.findObjects(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_CERTIFICATE),
				pkcs11.NewAttribute(pkcs11.CKA_SUBJECT, c.RawIssuer)}, maxRefObjects)
			if err != nil {
				return err
			}
			var issuer *x509.Certificate
			for _, h := range objs {
				attrs, err := in.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
				if err != nil {
					return err
				}
				cand, err := x509.ParseCertificate(attrs[0].Value)
				if err == nil && !seen[string(cand.Raw)] && c.CheckSignatureFrom(cand) == nil {
					issuer = cand
					break
				}
			}
			if issuer == nil {
				return nil // the rest of the chain is not on the token
			}
			chain = append(chain, issuer)
			seen[string(issuer.Raw)] = true // a cross-signed pair ends the chain, not loops it
			c = issuer
		}
		return nil
	})
	return chain, err
}

// DeleteCertificate deletes the certificate stored for the key ref names
// (as Certificate finds it). The key stays. Safe for concurrent use.
func (p *Provider) DeleteCertificate(ref KeyRef) error {
	const op = "delete certificate"
	ref, _, err := p.certificateRef(ref)
	if err != nil {
		return err
	}
	return p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		h, err := in.findOne(s, op, certTemplate(ref), "certificate object", certRef(ref))
		if err != nil {
			return err
		}
		if err := in.ctx.DestroyObject(s, h); err != nil {
			return stepErr("C_DestroyObject", err)
		}
		return nil
	})
}

// Random returns a reader of random bytes from the token's generator
// (C_GenerateRandom), of the generation current at each Read: it fails fast
// with ErrUnavailable during an outage. Each Read asks for at most 1 KiB
// (io.ReadFull reads more). Safe for concurrent use.
func (p *Provider) Random() io.Reader { return random{p} }

type random struct{ p *Provider }

const maxRandom = 1024

func (r random) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	n := min(len(b), maxRandom)
	err := r.p.withSession("random", func(in *instance, s pkcs11.SessionHandle) error {
		out, err := in.ctx.GenerateRandom(s, n)
		if err != nil {
			return stepErr("C_GenerateRandom", err)
		}
		if len(out) != n {
			return fmt.Errorf("C_GenerateRandom returned %d bytes, want %d", len(out), n)
		}
		copy(b, out)
		return nil
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}
