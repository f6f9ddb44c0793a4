package hsm

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"slices"
	"strings"
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
	// Derive makes an EC key (ECDSAP256, ECDSAP384, ECDSAP521) a
	// key-agreement key, for KeyExchanger (ECDH): CKA_DERIVE on the
	// private half, and CKA_SIGN off (CKA_VERIFY off on the public half),
	// so that the key agrees keys and does nothing else. Not for RSA or
	// Ed25519 keys.
	Derive bool
	// DeriveAndSign is Derive, with signing kept on: the key agrees keys
	// and signs (CKA_DERIVE and CKA_SIGN). One key for both purposes is
	// discouraged (NIST SP 800-57 part 1, 5.2); some protocols want it.
	DeriveAndSign bool
	// Extractable sets CKA_EXTRACTABLE on the private half (default false:
	// the key never leaves the HSM, even wrapped).
	Extractable bool
	// AllowedMechanisms, when not empty, restricts the private half to
	// these mechanisms (CKA_ALLOWED_MECHANISMS; the CKM_* values of
	// github.com/miekg/pkcs11, e.g. pkcs11.CKM_SHA256_RSA_PKCS_PSS), where
	// the token enforces it. A key restricted to hash-and-sign mechanisms
	// (CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS, CKM_ECDSA_SHA256...)
	// signs messages with SignMessage, as crypto/tls and crypto/x509 do,
	// and cannot sign a digest with Sign (see the package documentation,
	// "Choosing a key"). The list is read back after generation: a module
	// that does not keep it makes GenerateKey fail and delete the pair.
	// Empty: no restriction.
	AllowedMechanisms []uint
	// PrivateAttributes and PublicAttributes are added to the templates of
	// the halves, replacing an attribute of the same type, for vendor
	// quirks. Handle with care: CKA_SENSITIVE false or CKA_EXTRACTABLE true
	// here weakens the key.
	PrivateAttributes, PublicAttributes []Attribute
}

// GenerateKey generates a key pair on the token and returns it as a Signer
// of the current generation. The private half is a token object, private,
// sensitive and not extractable (unless spec says so), and can sign and
// nothing else: CKA_SIGN, and CKA_DECRYPT, CKA_UNWRAP and CKA_DERIVE false
// (CKA_DECRYPT true with spec.Decrypt; CKA_DERIVE true and CKA_SIGN false
// with spec.Derive, both true with spec.DeriveAndSign). The public half can
// verify and nothing else: CKA_VERIFY, and CKA_ENCRYPT, CKA_WRAP and
// CKA_DERIVE false (CKA_ENCRYPT true with spec.Decrypt; CKA_VERIFY false
// with spec.Derive). A key-agreement key is returned as a Signer all the
// same, whose Sign refuses (ErrUnsupportedKey) unless spec.DeriveAndSign:
// Provider.KeyExchanger(s.KeyRef()) gives its ecdh.KeyExchanger. spec.PrivateAttributes and
// spec.PublicAttributes may ask for more, and spec.AllowedMechanisms
// restricts the mechanisms of the private half. Whatever the module's
// defaults, every one of these is read back after generation; one the
// module set against the spec is turned off, and if the module refuses
// that (or did not keep the allowed mechanisms), the pair is deleted and
// GenerateKey fails.
//
// It refuses a label, or an ID, that a private key already has
// (ErrKeyExists). That makes a retry safe: when the HSM is lost during a
// generation, the key may or may not have been made; after recovery, a
// second GenerateKey with the same spec either makes it or fails with
// ErrKeyExists, whose message says to look the key up. When the loss cut
// the generation short, the retry (the same label, ID and type, on the
// same Provider) finishes what it left: a lone half it made is deleted and
// the key generated again, a whole pair it made is finished (its ID, its
// attributes) and returned, so that the token holds exactly one pair.
// Objects it did not make are never touched: with the computed ID, a
// public key under the label that was there before the generation makes
// the retry leave what it finds (give KeySpec.ID for exact retries), and
// DeleteKey removes a lone public key when asked by its reference. Two
// GenerateKey calls of one Provider run one at a time (the second waits up
// to Config.SessionWaitTimeout, then ErrBusy); other processes are not
// excluded.
//
// It blocks for the generation (an RSA-4096 key can take seconds) and up to
// Config.SessionWaitTimeout for a session. Safe for concurrent use.
func (p *Provider) GenerateKey(spec KeySpec) (*Signer, error) {
	const op = "generate key"
	gen := p.Generation()
	tmpl, err := spec.templates()
	if err != nil {
		return nil, &Error{Op: op, Generation: gen, Err: err}
	}
	// One at a time; the wait is bounded like a session's.
	t := time.NewTimer(p.cfg.SessionWaitTimeout)
	select {
	case p.mod.genSem <- struct{}{}:
		t.Stop()
	case <-t.C:
		return nil, &Error{Op: op, Generation: gen, Err: wrapf(ErrBusy, "another GenerateKey has run for %v", p.cfg.SessionWaitTimeout)}
	}
	defer func() { <-p.mod.genSem }()
	// cut is set once C_GenerateKeyPair has been called, until the pair is
	// handed out: a failure in between may leave objects on the token.
	var cut *cutShort
	var k *key
	err = p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		var ph, kh pkcs11.ObjectHandle
		if prev := p.cutShort[spec.Label]; prev != nil && prev.sameSpec(spec) {
			// A generation of this spec was cut short: finish what it left.
			var found bool
			var err error
			if ph, kh, found, err = in.leftBy(s, prev, tmpl, p.log); err != nil {
				return err
			}
			if found {
				cut = prev
				k, err = in.finishPair(s, spec, tmpl, ph, kh)
				return err
			}
		}
		// The label must be free among private keys, and the ID among all
		// objects: a public half or a certificate left with it would be
		// taken for the new key's.
		taken := func(tmpl []*pkcs11.Attribute) (int, error) {
			handles, err := in.findObjects(s, tmpl, maxRefObjects)
			return len(handles), err
		}
		if n, err := taken(refTemplate(pkcs11.CKO_PRIVATE_KEY, nil, spec.Label)); err != nil {
			return err
		} else if n > 0 {
			return opErr(op, in.gen, ErrKeyExists, "a private key with %s is on the token: look it up (Signer, DurableSigner) or delete it (DeleteKey)", KeyRef{Label: spec.Label})
		}
		c := &cutShort{spec: spec}
		if len(spec.ID) > 0 {
			if n, err := taken(refTemplate(0, spec.ID, "")); err != nil {
				return err
			} else if n > 0 {
				return opErr(op, in.gen, ErrKeyExists, "an object with %s is on the token: look it up (Signer, DurableSigner), or delete it (DeleteKey for a key or a lone public key, DeleteCertificate for a certificate)", KeyRef{ID: spec.ID})
			}
		} else {
			// With the computed ID, what a cut-short generation leaves has
			// no ID yet: only the label tells it, and only if no object had
			// the label before.
			n, err := taken(refTemplate(0, nil, spec.Label))
			if err != nil {
				return err
			}
			c.labelTaken = n > 0
		}
		cut = c
		var err error
		if ph, kh, err = in.generatePair(s, spec, tmpl); err != nil {
			if code, ok := codeOf(err); ok && classify(code) == classCaller {
				cut = nil // refused: nothing was made
			}
			return err
		}
		k, err = in.finishPair(s, spec, tmpl, ph, kh)
		return err
	})
	switch {
	case err == nil:
		delete(p.cutShort, spec.Label)
	case cut != nil && !errors.Is(err, ErrUnsupportedKey) && !errors.Is(err, ErrKeyExists):
		// The outcome is unknown (the HSM lost, hung, or the module failed
		// after C_GenerateKeyPair): a retry finishes what is left.
		if p.cutShort == nil {
			p.cutShort = map[string]*cutShort{}
		}
		p.cutShort[spec.Label] = cut
	}
	if err != nil {
		return nil, err
	}
	return &Signer{p.adopt(k)}, nil
}

// cutShort is a GenerateKey whose C_GenerateKeyPair was called and did
// not end in a key handed out: the HSM was lost, hung, or failed during or
// after it. Provider.cutShort keeps them by label (guarded by genSem).
type cutShort struct {
	spec KeySpec
	// labelTaken: with the computed ID, objects with the label were on
	// the token before the generation, so the objects it left cannot be
	// told from them.
	labelTaken bool
}

// sameSpec reports whether spec is the generation that was cut short.
func (c *cutShort) sameSpec(spec KeySpec) bool {
	return c.spec.Label == spec.Label && c.spec.Type == spec.Type && bytes.Equal(c.spec.ID, spec.ID)
}

// leftBy finds what the cut-short generation c left: the objects with its
// label (and ID), of its key type and size, that no object had before it.
// A whole pair is returned (found) to be finished. Lone halves are
// deleted, so that the key is generated again. Anything else (several
// pairs, objects that were there before) is left alone.
func (in *instance) leftBy(s pkcs11.SessionHandle, c *cutShort, tmpl keyTemplates, log *slog.Logger) (ph, kh pkcs11.ObjectHandle, found bool, err error) {
	if len(c.spec.ID) == 0 && c.labelTaken {
		log.Warn("hsm: a key generation cut short may have left objects that cannot be told from others with its label (they were there before it): nothing deleted", "label", c.spec.Label)
		return 0, 0, false, nil
	}
	handles, err := in.findObjects(s, refTemplate(0, c.spec.ID, c.spec.Label), maxRefObjects)
	if err != nil || len(handles) > maxRefObjects {
		return 0, 0, false, err
	}
	var privs, pubs []object
	for _, h := range handles {
		o, err := in.readObject(s, h)
		if err != nil {
			return 0, 0, false, err
		}
		if !o.hasClass || !o.hasKeyType || o.keyType != tmpl.keyType || o.label != c.spec.Label {
			continue
		}
		if len(c.spec.ID) == 0 && len(o.id) > 0 && !bytes.Equal(o.id, skiOf(o)) {
			continue // an ID the generation did not set
		}
		switch {
		case o.class == pkcs11.CKO_PRIVATE_KEY && tmpl.fits(&o):
			privs = append(privs, o)
		case o.class == pkcs11.CKO_PUBLIC_KEY && tmpl.fits(&o):
			pubs = append(pubs, o)
		}
	}
	switch {
	case len(privs) == 1 && len(pubs) == 1:
		return pubs[0].h, privs[0].h, true, nil
	case len(privs)+len(pubs) == 1:
		o := append(privs, pubs...)[0]
		if err := in.ctx.DestroyObject(s, o.h); err != nil {
			return 0, 0, false, stepErr("C_DestroyObject (a half left by a generation cut short)", err)
		}
		log.Info("hsm: deleted the lone half of a key pair that a key generation cut short had left", "label", c.spec.Label, "id", hex.EncodeToString(o.id), "class", o.class)
	}
	return 0, 0, false, nil
}

// skiOf is the computed ID of a public key object read by readObject, or
// nil when it cannot say (a private key object, an unreadable key).
func skiOf(o object) []byte {
	if o.class != pkcs11.CKO_PUBLIC_KEY {
		return o.id // a private half's ID is checked with its public half
	}
	pub, err := publicOf(&o)
	if err != nil {
		return nil
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil
	}
	return ski(der)
}

// generatePair runs C_GenerateKeyPair with the templates of spec: first
// with every capability the spec does not ask for turned off in the
// templates; where the module refuses such a template, then without
// CKA_DECRYPT and CKA_ENCRYPT false (tpm2-pkcs11 refuses those, with
// CKR_GENERAL_ERROR), then without any (finishPair turns off after
// generation what the module's defaults turn on); for Ed25519, with each
// encoding of the curve PKCS#11 3.0 allows.
func (in *instance) generatePair(s pkcs11.SessionHandle, spec KeySpec, tmpl keyTemplates) (ph, kh pkcs11.ObjectHandle, err error) {
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(tmpl.mech, nil)}
	in.long(func() {
		for level := offAll; level <= offNone; level++ {
			for _, params := range tmpl.params {
				pub, priv := tmpl.build(level, params)
				ph, kh, err = in.ctx.GenerateKeyPair(s, mech, pub, priv)
				if err == nil {
					return
				}
				code, _ := codeOf(err)
				if !refusesTemplate(err) && (level == offNone || code != pkcs11.CKR_GENERAL_ERROR) {
					return
				}
			}
		}
	})
	if err != nil {
		return 0, 0, stepErr("C_GenerateKeyPair", err)
	}
	return ph, kh, nil
}

// How much of what the spec does not ask for a template turns off.
const (
	offAll      = iota // every capability
	offNotCrypt        // all but CKA_DECRYPT and CKA_ENCRYPT
	offNone            // none: finishPair turns them off after generation
)

// finishPair makes the pair GenerateKey generated (ph, kh) what spec asks
// for, and the key: the capabilities the spec does not ask for off on both
// halves, the computed ID set when spec has none. A pair that cannot be
// made so is deleted.
func (in *instance) finishPair(s pkcs11.SessionHandle, spec KeySpec, tmpl keyTemplates, ph, kh pkcs11.ObjectHandle) (*key, error) {
	const op = "generate key"
	for _, half := range []struct {
		h     pkcs11.ObjectHandle
		attrs []boolAttr
		name  string
	}{{kh, tmpl.privBools, "private"}, {ph, tmpl.pubBools, "public"}} {
		if err := in.enforce(s, half.h, half.attrs); err != nil {
			code, _ := codeOf(err) // kept: a device lost here is the HSM's, not the spec's
			return nil, &Error{Op: op, Code: code, Generation: in.gen, Err: wrapf(err, "the %s half: %s", half.name, in.discard(s, spec.Label, ph, kh))}
		}
	}
	po, err := in.readObject(s, ph)
	if err != nil {
		return nil, err
	}
	ko, err := in.readObject(s, kh)
	if err != nil {
		return nil, err
	}
	if tmpl.allowed != nil {
		// Read back on its own: a lookup that reads only what each
		// object has leaves it out (strictValues).
		v, err := in.slowAttrs(s, kh, []uint{pkcs11.CKA_ALLOWED_MECHANISMS})
		if err != nil {
			return nil, err
		}
		if ko.allowed = parseMechanisms(v[0]); !sameMechanisms(ko.allowed, tmpl.allowed) {
			return nil, opErr(op, in.gen, ErrUnsupportedKey, "the module did not keep CKA_ALLOWED_MECHANISMS %s on the private half (it reads %q): %s",
				mechList(tmpl.allowed), mechList(ko.allowed), in.discard(s, spec.Label, ph, kh))
		}
	}
	k, err := in.keyFrom(s, &ko, []object{po})
	if err != nil {
		return nil, in.unusable(s, spec.Label, ph, kh, err)
	}
	id := spec.ID
	if len(id) == 0 {
		// The computed ID, from the public key.
		der, err := x509.MarshalPKIXPublicKey(k.pub)
		if err != nil {
			return nil, opErr(op, in.gen, ErrUnsupportedKey, "public key: %v", err)
		}
		id = ski(der)
	}
	if !bytes.Equal(ko.id, id) || !bytes.Equal(po.id, id) {
		for _, h := range []pkcs11.ObjectHandle{kh, ph} {
			if err := in.ctx.SetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_ID, id)}); err != nil {
				// Do not leave a key without its ID (or with it on one
				// half only): delete the pair.
				code, _ := codeOf(err)
				return nil, &Error{Op: op, Code: code, Generation: in.gen, Err: wrapf(stepErr("C_SetAttributeValue (CKA_ID)", err),
					"%s; give KeySpec.ID for an HSM that sets CKA_ID only at generation", in.discard(s, spec.Label, ph, kh))}
			}
		}
		ko.id, po.id = id, id
		if k, err = in.keyFrom(s, &ko, []object{po}); err != nil {
			return nil, in.unusable(s, spec.Label, ph, kh, err)
		}
	}
	k.proven = true // one pair, made as one by C_GenerateKeyPair
	return k, nil
}

// sameMechanisms reports whether a and b hold the same mechanisms, in
// any order.
func sameMechanisms(a, b []uint) bool {
	if len(a) != len(b) {
		return false
	}
	for _, m := range a {
		if !slices.Contains(b, m) {
			return false
		}
	}
	for _, m := range b {
		if !slices.Contains(a, m) {
			return false
		}
	}
	return true
}

// boolAttr is a CK_BBOOL attribute of a generated key and its value.
type boolAttr struct {
	typ uint
	on  bool
}

// enforce reads attrs of object h back, and turns off, with one
// C_SetAttributeValue, those the module set on against them. An attribute
// the spec wants on that is off is an error (the module ignored the
// template). An attribute the object does not have is off.
func (in *instance) enforce(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, attrs []boolAttr) error {
	types := make([]uint, len(attrs))
	for i, a := range attrs {
		types[i] = a.typ
	}
	vals, err := in.slowAttrs(s, h, types)
	if err != nil {
		return err
	}
	var off []*pkcs11.Attribute
	var names []string
	for i, a := range attrs {
		switch on := isTrue(vals[i]); {
		case on && !a.on:
			off = append(off, pkcs11.NewAttribute(a.typ, false))
			names = append(names, attrName(a.typ))
		case !on && a.on:
			return fmt.Errorf("the module did not set %s, which the key needs", attrName(a.typ))
		}
	}
	if len(off) == 0 {
		return nil
	}
	if err := in.ctx.SetAttributeValue(s, h, off); err != nil {
		return wrapf(stepErr("C_SetAttributeValue", err), "the module set %s against the spec and refuses to turn them off", strings.Join(names, ", "))
	}
	return nil
}

// attrName names the CKA_ attributes enforce checks.
func attrName(t uint) string {
	switch t {
	case pkcs11.CKA_SIGN:
		return "CKA_SIGN"
	case pkcs11.CKA_VERIFY:
		return "CKA_VERIFY"
	case pkcs11.CKA_DECRYPT:
		return "CKA_DECRYPT"
	case pkcs11.CKA_ENCRYPT:
		return "CKA_ENCRYPT"
	case pkcs11.CKA_UNWRAP:
		return "CKA_UNWRAP"
	case pkcs11.CKA_WRAP:
		return "CKA_WRAP"
	case pkcs11.CKA_DERIVE:
		return "CKA_DERIVE"
	}
	return fmt.Sprintf("attribute 0x%x", t)
}

// refusesTemplate reports whether a C_GenerateKeyPair failure means the
// module refuses an attribute or value of the templates (or the curve's
// encoding), so that another template may be tried.
func refusesTemplate(err error) bool {
	code, _ := codeOf(err)
	switch code {
	case pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID, pkcs11.CKR_ATTRIBUTE_READ_ONLY,
		pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_CURVE_NOT_SUPPORTED, pkcs11.CKR_DOMAIN_PARAMS_INVALID:
		return true
	}
	return false
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
		return fmt.Sprintf("deleting the key pair made failed too (%v): delete the key labelled %q (DeleteKey)", err, label)
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

// keyTemplates is what GenerateKey makes of a KeySpec.
type keyTemplates struct {
	mech, keyType uint
	// pub and priv are the templates without the capabilities turned off;
	// pubOff and privOff are those, added by build when strict.
	pub, priv, pubOff, privOff []*pkcs11.Attribute
	// params are the encodings of the curve to try (CKA_EC_PARAMS of the
	// public half), or one nil for RSA.
	params [][]byte
	// bits is the RSA modulus size.
	bits int
	// privBools and pubBools are the capabilities each half must end with.
	privBools, pubBools []boolAttr
	// overrides are the spec's own attributes, last in each template.
	pubOverrides, privOverrides []*pkcs11.Attribute
	// allowed is the private half's CKA_ALLOWED_MECHANISMS the spec asks
	// for (AllowedMechanisms, or in PrivateAttributes), to be read back;
	// nil for none.
	allowed []uint
}

// build returns the templates of the public and the private half, with
// the capabilities the spec does not ask for turned off as level says,
// and the curve's parameters.
func (t keyTemplates) build(level int, params []byte) (pub, priv []*pkcs11.Attribute) {
	pub = append([]*pkcs11.Attribute{}, t.pub...)
	priv = append([]*pkcs11.Attribute{}, t.priv...)
	for _, half := range []struct {
		tmpl *[]*pkcs11.Attribute
		off  []*pkcs11.Attribute
	}{{&pub, t.pubOff}, {&priv, t.privOff}} {
		for _, a := range half.off {
			if level == offAll || level == offNotCrypt && a.Type != pkcs11.CKA_DECRYPT && a.Type != pkcs11.CKA_ENCRYPT {
				*half.tmpl = append(*half.tmpl, a)
			}
		}
	}
	if params != nil {
		pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
	}
	for _, a := range t.pubOverrides {
		pub = replaceAttr(pub, a)
	}
	for _, a := range t.privOverrides {
		priv = replaceAttr(priv, a)
	}
	return pub, priv
}

// fits reports whether o is of the size or curve the templates make.
func (t keyTemplates) fits(o *object) bool {
	if t.keyType == pkcs11.CKK_RSA {
		return len(o.modulus) == 0 || len(o.modulus)*8 == t.bits || len(trimZeros(o.modulus))*8 == t.bits
	}
	for _, p := range t.params {
		if sameCurve(t.keyType, p, o.ecParams) {
			return true
		}
	}
	return false
}

// publicOf is the public key of a public key object read by readObject.
func publicOf(o *object) (crypto.PublicKey, error) {
	switch {
	case o.keyType == pkcs11.CKK_RSA:
		e := new(big.Int).SetBytes(o.exponent)
		if len(o.modulus) == 0 || !e.IsInt64() || e.Int64() > 1<<31-1 {
			return nil, errors.New("no usable modulus or exponent")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(o.modulus), E: int(e.Int64())}, nil
	case o.keyType == pkcs11.CKK_EC:
		curve, err := curveOf(o.ecParams)
		if err != nil {
			return nil, err
		}
		return pointKey(curve, o.ecPoint)
	case o.keyType == ckkECEdwards:
		return pointKey(nil, o.ecPoint)
	}
	return nil, errors.New("not an RSA, EC or Ed25519 key")
}

// templates returns what GenerateKey makes of spec, or why spec is not
// valid.
func (spec KeySpec) templates() (keyTemplates, error) {
	var t keyTemplates
	switch {
	case spec.Label == "":
		return t, errOpts("KeySpec.Label is empty: a key needs a label")
	case !utf8.ValidString(spec.Label):
		return t, errOpts("KeySpec.Label is not valid UTF-8")
	case spec.Decrypt && spec.Type.rsaBits() == 0:
		return t, errOpts("KeySpec.Decrypt: only RSA keys decrypt, not %v", spec.Type)
	case (spec.Derive || spec.DeriveAndSign) && spec.Type != ECDSAP256 && spec.Type != ECDSAP384 && spec.Type != ECDSAP521:
		return t, errOpts("KeySpec.Derive: only EC keys (ECDSAP256, ECDSAP384, ECDSAP521) agree keys, not %v", spec.Type)
	}
	derive := spec.Derive || spec.DeriveAndSign
	sign := !derive || spec.DeriveAndSign
	t.pub = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
	}
	if sign {
		t.pub = append(t.pub, pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true))
	}
	t.priv = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, spec.Extractable),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, spec.Label),
	}
	if sign {
		t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_SIGN, true))
	}
	if derive {
		t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true))
	}
	if len(spec.ID) > 0 {
		t.pub = append(t.pub, pkcs11.NewAttribute(pkcs11.CKA_ID, spec.ID))
		t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_ID, spec.ID))
	}
	switch spec.Type {
	case RSA2048, RSA3072, RSA4096:
		t.mech, t.keyType, t.bits = pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pkcs11.CKK_RSA, spec.Type.rsaBits()
		t.pub = append(t.pub,
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, spec.Type.rsaBits()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
		t.params = [][]byte{nil}
		if spec.Decrypt {
			t.pub = append(t.pub, pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true))
			t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true))
		}
	case ECDSAP256, ECDSAP384, ECDSAP521:
		t.mech, t.keyType = pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKK_EC
		t.params = [][]byte{map[KeyType][]byte{ECDSAP256: p256Params, ECDSAP384: p384Params, ECDSAP521: p521Params}[spec.Type]}
	case Ed25519:
		// RFC 8410's OID, then the PrintableString "edwards25519" that
		// PKCS#11 3.0 also allows (SoftHSM 2.6 takes only this one).
		t.mech, t.keyType = ckmECEdwardsKeyPairGen, ckkECEdwards
		t.params = [][]byte{ed25519OID, ed25519String}
	default:
		return t, errOpts("KeySpec.Type %v is not one of RSA2048, RSA3072, RSA4096, ECDSAP256, ECDSAP384, ECDSAP521, Ed25519", spec.Type)
	}
	t.pub = append(t.pub, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, t.keyType))
	t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, t.keyType))
	var err error
	if t.pubOverrides, err = override(spec.PublicAttributes, "PublicAttributes"); err != nil {
		return t, err
	}
	if t.privOverrides, err = override(spec.PrivateAttributes, "PrivateAttributes"); err != nil {
		return t, err
	}
	for _, a := range t.privOverrides {
		if a.Type == pkcs11.CKA_ALLOWED_MECHANISMS {
			if len(spec.AllowedMechanisms) > 0 {
				return t, errOpts("KeySpec.AllowedMechanisms and a CKA_ALLOWED_MECHANISMS in KeySpec.PrivateAttributes: give one")
			}
			t.allowed = parseMechanisms(a.Value)
		}
	}
	if len(spec.AllowedMechanisms) > 0 {
		t.allowed = spec.AllowedMechanisms
		t.priv = append(t.priv, pkcs11.NewAttribute(pkcs11.CKA_ALLOWED_MECHANISMS, ulongs(spec.AllowedMechanisms)))
	}
	// Least privilege: each half can do what the spec asks, nothing else.
	t.privBools = wanted([]boolAttr{{pkcs11.CKA_SIGN, sign}, {pkcs11.CKA_DECRYPT, spec.Decrypt}, {pkcs11.CKA_UNWRAP, false}, {pkcs11.CKA_DERIVE, derive}}, t.privOverrides)
	t.pubBools = wanted([]boolAttr{{pkcs11.CKA_VERIFY, sign}, {pkcs11.CKA_ENCRYPT, spec.Decrypt}, {pkcs11.CKA_WRAP, false}, {pkcs11.CKA_DERIVE, false}}, t.pubOverrides)
	t.privOff, t.pubOff = offAttrs(t.privBools), offAttrs(t.pubBools)
	return t, nil
}

// wanted is attrs with the values the spec's own attributes give them.
func wanted(attrs []boolAttr, overrides []*pkcs11.Attribute) []boolAttr {
	for _, o := range overrides {
		for i := range attrs {
			if attrs[i].typ == o.Type {
				attrs[i].on = isTrue(o.Value)
			}
		}
	}
	return attrs
}

// offAttrs is the template of the attributes of attrs that are off.
func offAttrs(attrs []boolAttr) []*pkcs11.Attribute {
	var t []*pkcs11.Attribute
	for _, a := range attrs {
		if !a.on {
			t = append(t, pkcs11.NewAttribute(a.typ, false))
		}
	}
	return t
}

// CKM_EC_EDWARDS_KEY_PAIR_GEN (PKCS#11 3.0; miekg/pkcs11 v1.1.2 lacks it).
const ckmECEdwardsKeyPairGen = 0x1055

// override checks the spec's own attributes and returns them as PKCS#11
// attributes, each to replace an attribute of its type in a template.
func override(attrs []Attribute, field string) ([]*pkcs11.Attribute, error) {
	var out []*pkcs11.Attribute
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
		out = append(out, pkcs11.NewAttribute(a.Type, a.Value))
	}
	return out, nil
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
//
// When no private key matches ref, it deletes the one public key that ref
// names and that has no private half (none with its CKA_ID, or, without
// one, its label): a lone public key, such as a key generation cut short
// by a lost HSM can leave, which would otherwise hold its ID for good.
// Several such public keys are ErrAmbiguousKey, none ErrKeyNotFound.
// Safe for concurrent use.
func (p *Provider) DeleteKey(ref KeyRef) error {
	const op = "delete key"
	if len(ref.ID) == 0 && ref.Label == "" {
		return opErr(op, p.Generation(), ErrKeyNotFound, "empty KeyRef: set ID, Label or both")
	}
	return p.write(op, func(in *instance, s pkcs11.SessionHandle) error {
		h, err := in.findOne(s, op, refTemplate(pkcs11.CKO_PRIVATE_KEY, ref.ID, ref.Label), "private key", ref)
		if errors.Is(err, ErrKeyNotFound) {
			return in.deleteLonePublic(s, ref)
		}
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

// deleteLonePublic deletes the one public key ref names that has no
// private half, for DeleteKey.
func (in *instance) deleteLonePublic(s pkcs11.SessionHandle, ref KeyRef) error {
	const op = "delete key"
	handles, err := in.findObjects(s, refTemplate(pkcs11.CKO_PUBLIC_KEY, ref.ID, ref.Label), maxRefObjects)
	if err != nil {
		return err
	}
	var lone []pkcs11.ObjectHandle
	for _, h := range handles {
		o, err := in.readObject(s, h)
		if err != nil {
			return err
		}
		if len(o.id) == 0 && o.label == "" {
			continue // its private half cannot be told: never deleted alone
		}
		label := ""
		if len(o.id) == 0 {
			label = o.label
		}
		tmpl := refTemplate(pkcs11.CKO_PRIVATE_KEY, o.id, label)
		if o.hasKeyType {
			tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, o.keyType))
		}
		privs, err := in.findObjects(s, tmpl, 0)
		if err != nil {
			return err
		}
		if len(privs) == 0 {
			lone = append(lone, h)
		}
	}
	switch {
	case len(lone) == 0:
		return opErr(op, in.gen, ErrKeyNotFound, "no private key, and no public key without its private key, with %s", ref)
	case len(lone) > 1:
		return opErr(op, in.gen, ErrAmbiguousKey, "no private key, and several public keys without their private keys, with %s: nothing deleted", ref)
	}
	if err := in.ctx.DestroyObject(s, lone[0]); err != nil {
		return stepErr("C_DestroyObject", err)
	}
	return nil
}

// ImportCertificate stores cert on the token as a CKO_CERTIFICATE (X.509)
// with CKA_SUBJECT, CKA_ISSUER, CKA_SERIAL_NUMBER and CKA_VALUE, all taken
// from cert.Raw, which must parse as a certificate (x509.ParseCertificate);
// cert's other fields are not looked at. When a
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
	// What is stored is cert.Raw: it is what must parse, and be for the
	// key, whatever the other fields of cert say.
	parsed, err := x509.ParseCertificate(cert.Raw)
	if err != nil {
		return opErr(op, p.Generation(), ErrInvalidOptions, "cert.Raw is not a certificate: %v", err)
	}
	cert = parsed
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
