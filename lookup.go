package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// A lookup costs one find and one attribute read per object it looks at:
// the find by CKA_ID and CKA_LABEL has no CKA_CLASS, so that the private key
// and its public half (which shares them) come back from one scan of the
// token, and every object is read in one C_GetAttributeValue (fastAttrs).
// SoftHSM scans the token and decrypts the attributes of private objects for
// every find, and a network HSM adds a round trip per call, so the number of
// finds is what a lookup costs.

// object is what a lookup reads of one object.
type object struct {
	h                    pkcs11.ObjectHandle
	class, keyType       uint
	hasClass, hasKeyType bool
	id                   []byte
	label                string
	sign, decrypt        bool
	derive               bool // CKA_DERIVE
	alwaysAuth           bool // CKA_ALWAYS_AUTHENTICATE
	// allowed is CKA_ALLOWED_MECHANISMS, nil when absent or empty (or not
	// read: strictValues leaves it out).
	allowed []uint
	// Public parts: on RSA private keys (most tokens), on public keys.
	modulus, exponent, ecParams, ecPoint []byte
}

// lookupAttrs are the attributes readObject reads, in its order.
var lookupAttrs = []uint{pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE, pkcs11.CKA_ID, pkcs11.CKA_LABEL,
	pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT, pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT,
	pkcs11.CKA_EC_PARAMS, pkcs11.CKA_EC_POINT, pkcs11.CKA_ALWAYS_AUTHENTICATE, pkcs11.CKA_ALLOWED_MECHANISMS, pkcs11.CKA_DERIVE}

// readObject reads object h: one C_GetAttributeValue where the module's
// function list is validated and the module answers a partial read as the
// standard says; else one call for its class, one for the attributes of its
// class and key type, and one for its public parts (strictValues).
func (in *instance) readObject(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) (object, error) {
	v, err := in.objectValues(s, h)
	if err != nil {
		return object{}, err
	}
	o := object{h: h, id: bytes.Clone(v[2]), label: string(v[3]),
		sign: isTrue(v[4]), decrypt: isTrue(v[5]), alwaysAuth: isTrue(v[10]),
		modulus: bytes.Clone(v[6]), exponent: bytes.Clone(v[7]), ecParams: bytes.Clone(v[8]), ecPoint: bytes.Clone(v[9]),
		allowed: parseMechanisms(v[11]), derive: isTrue(v[12])}
	if v[0] != nil {
		o.class, o.hasClass = ulong(v[0]), true
	}
	if v[1] != nil {
		o.keyType, o.hasKeyType = ulong(v[1]), true
	}
	return o, nil
}

// objectValues reads lookupAttrs of object h.
func (in *instance) objectValues(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) ([][]byte, error) {
	if in.fast == nil || in.strictAttrs.Load() {
		return in.strictValues(s, h)
	}
	v, partial, err := fastAttrs(in.fast, s, h, lookupAttrs)
	switch code, _ := codeOf(err); {
	case err != nil && code != pkcs11.CKR_BUFFER_TOO_SMALL:
		return nil, err
	case err == nil && !partial:
		return v, nil
	case err == nil && (len(v[0]) == 4 || len(v[0]) == 8):
		// A partial answer that reads like the standard's (every object
		// has a CKA_CLASS): keep it, and read again what it may hide.
		return v, in.refill(s, h, v)
	case err == nil:
		// The module's partial answers are not to be trusted (NSS softokn
		// leaves the attributes it did read empty): from now on, read
		// only what each object has.
		in.strictAttrs.Store(true)
	}
	return in.strictValues(s, h)
}

// strictValues reads lookupAttrs of object h asking each time only for
// attributes the object has: its class, then the attributes of its class,
// then the parts of its key type. A private key's CKA_ALLOWED_MECHANISMS
// is read with the attributes of its class until the module shows it does
// not have it (NSS softokn): from then on, in this generation, it is not
// asked for, and a restricted key is known by the token's first refusal
// (message.go).
func (in *instance) strictValues(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) ([][]byte, error) {
	v := make([][]byte, len(lookupAttrs))
	read := func(idx ...int) error {
		types := make([]uint, len(idx))
		for j, i := range idx {
			types[j] = lookupAttrs[i]
		}
		vals, err := in.completeAttrs(s, h, types)
		for j, i := range idx {
			if err == nil {
				v[i] = vals[j]
			}
		}
		return err
	}
	if err := read(0); err != nil || v[0] == nil { // CKA_CLASS
		return v, err
	}
	switch ulong(v[0]) {
	case pkcs11.CKO_PRIVATE_KEY:
		if in.noAllowed.Load() {
			if err := read(1, 2, 3, 4, 5, 10, 12); err != nil { // type, ID, label, sign, decrypt, always authenticate, derive
				return nil, err
			}
		} else {
			if err := read(1, 2, 3, 4, 5, 10, 12, 11); err != nil { // and allowed mechanisms
				return nil, err
			}
			if v[11] == nil {
				in.noAllowed.Store(true)
			}
		}
	case pkcs11.CKO_PUBLIC_KEY:
		if err := read(1, 2, 3); err != nil {
			return nil, err
		}
	default:
		return v, read(2, 3)
	}
	if v[1] == nil {
		return v, nil
	}
	switch keyType := ulong(v[1]); {
	case keyType == pkcs11.CKK_RSA:
		return v, read(6, 7) // modulus, exponent (a private key may keep them: absent)
	case keyType == pkcs11.CKK_EC || keyType == ckkECEdwards:
		if ulong(v[0]) == pkcs11.CKO_PUBLIC_KEY {
			return v, read(8, 9) // params, point
		}
		return v, read(8)
	}
	return v, nil
}

// completeAttrs reads types, which the object should all have, in one
// call when the module answers it whole, else one by one the slow way.
func (in *instance) completeAttrs(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, types []uint) ([][]byte, error) {
	if in.fast != nil {
		vals, partial, err := fastAttrs(in.fast, s, h, types)
		if code, _ := codeOf(err); err != nil && code != pkcs11.CKR_BUFFER_TOO_SMALL {
			return nil, err
		}
		if err == nil && !partial {
			return vals, nil
		}
	}
	return in.slowAttrs(s, h, types)
}

// refill reads again, the slow way, what the one-call read of lookupAttrs
// into v may have missed. When the read fails for one attribute (every
// object lacks some of them), a module may report another one that did not
// fit its buffer as absent too (SoftHSM's CKR_ATTRIBUTE_TYPE_INVALID hides
// its CKR_BUFFER_TOO_SMALL). The attributes every key has (CKA_ID,
// CKA_LABEL), and the public parts its class and key type have, are read
// again when they came back absent; for an ordinary key, none is.
func (in *instance) refill(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, v [][]byte) error {
	if in.fast == nil || v[0] == nil {
		return nil // read the slow way already, or not a key
	}
	class := ulong(v[0])
	if class != pkcs11.CKO_PRIVATE_KEY && class != pkcs11.CKO_PUBLIC_KEY {
		return nil
	}
	idx := []int{2, 3} // CKA_ID, CKA_LABEL
	if v[1] != nil {
		switch keyType := ulong(v[1]); {
		case keyType == pkcs11.CKK_RSA && class == pkcs11.CKO_PUBLIC_KEY:
			idx = append(idx, 6, 7) // CKA_MODULUS, CKA_PUBLIC_EXPONENT
		case keyType == pkcs11.CKK_EC || keyType == ckkECEdwards:
			idx = append(idx, 8) // CKA_EC_PARAMS
			if class == pkcs11.CKO_PUBLIC_KEY {
				idx = append(idx, 9) // CKA_EC_POINT
			}
		}
	}
	var missing []int
	var types []uint
	for _, i := range idx {
		if v[i] == nil {
			missing, types = append(missing, i), append(types, lookupAttrs[i])
		}
	}
	if len(missing) == 0 {
		return nil
	}
	vals, err := in.slowAttrs(s, h, types)
	if err != nil {
		return err
	}
	for j, i := range missing {
		v[i] = vals[j]
	}
	return nil
}

func isTrue(v []byte) bool { return len(v) == 1 && v[0] != 0 }

// slowAttrs reads types through miekg/pkcs11, which sizes every value (a
// value the object does not have, or keeps secret, is nil):
// two calls, and two per attribute when the module refuses one of them.
func (in *instance) slowAttrs(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, types []uint) ([][]byte, error) {
	tmpl := make([]*pkcs11.Attribute, len(types))
	for i, t := range types {
		tmpl[i] = pkcs11.NewAttribute(t, nil)
	}
	vals := make([][]byte, len(types))
	attrs, err := in.ctx.GetAttributeValue(s, h, tmpl)
	if err == nil {
		for i, a := range attrs {
			vals[i] = a.Value
			if vals[i] == nil {
				vals[i] = []byte{} // present and empty
			}
		}
		return vals, nil
	}
	if !absent(err) {
		return nil, err
	}
	for i, t := range tmpl {
		a, err := in.ctx.GetAttributeValue(s, h, []*pkcs11.Attribute{t})
		switch {
		case err == nil:
			vals[i] = a[0].Value
			if vals[i] == nil {
				vals[i] = []byte{}
			}
		case !absent(err):
			return nil, err
		}
	}
	return vals, nil
}

// absent reports whether err says an attribute is not there to read.
func absent(err error) bool {
	code, _ := codeOf(err)
	return code == pkcs11.CKR_ATTRIBUTE_TYPE_INVALID || code == pkcs11.CKR_ATTRIBUTE_SENSITIVE
}

// maxRefObjects bounds the objects one lookup reads: a reference that more
// objects share is looked up by class instead.
const maxRefObjects = 16

// find finds the one private key ref names, with its public key.
func (in *instance) find(s pkcs11.SessionHandle, ref KeyRef) (*key, error) {
	const op = "find key"
	handles, err := in.findObjects(s, refTemplate(0, ref.ID, ref.Label), maxRefObjects)
	if err != nil {
		return nil, err
	}
	if len(handles) > maxRefObjects {
		return in.findByClass(s, ref)
	}
	objs := make([]object, len(handles))
	var priv *object
	privs := 0
	for i, h := range handles {
		if objs[i], err = in.readObject(s, h); err != nil {
			return nil, err
		}
		if objs[i].hasClass && objs[i].class == pkcs11.CKO_PRIVATE_KEY {
			priv = &objs[i]
			privs++
		}
	}
	switch privs {
	case 0:
		return nil, opErr(op, in.gen, ErrKeyNotFound, "no private key with %s", ref)
	case 1:
	default:
		return nil, opErr(op, in.gen, ErrAmbiguousKey, "several private keys with %s", ref)
	}
	return in.keyFrom(s, priv, objs)
}

// findByClass finds the one private key ref names with a find that names
// the class.
func (in *instance) findByClass(s pkcs11.SessionHandle, ref KeyRef) (*key, error) {
	h, err := in.findOne(s, "find key", refTemplate(pkcs11.CKO_PRIVATE_KEY, ref.ID, ref.Label), "private key", ref)
	if err != nil {
		return nil, err
	}
	o, err := in.readObject(s, h)
	if err != nil {
		return nil, err
	}
	return in.keyFrom(s, &o, nil)
}

// keyFrom makes the key of private key object o. cands are objects already
// read that may hold its public half; when none does, keyFrom finds it.
func (in *instance) keyFrom(s pkcs11.SessionHandle, o *object, cands []object) (*key, error) {
	k := &key{in: in, gen: in.gen, handle: o.h, ref: KeyRef{ID: o.id, Label: o.label}, canSign: o.sign, canDecrypt: o.decrypt, canDerive: o.derive, alwaysAuth: o.alwaysAuth,
		mechs: newSignMechs(o.allowed)}
	var err error
	switch {
	case !o.hasKeyType:
		return nil, opErr("find key", in.gen, ErrUnsupportedKey, "%s has no readable CKA_KEY_TYPE", k.ref)
	case o.keyType == pkcs11.CKK_RSA:
		k.kind = kindRSA
		err = in.rsaPublic(s, k, o, cands)
	case o.keyType == pkcs11.CKK_EC:
		k.kind = kindECDSA
		err = in.ecPublic(s, k, o, cands)
	case o.keyType == ckkECEdwards:
		k.kind = kindEd25519
		err = in.ecPublic(s, k, o, cands)
	default:
		return nil, opErr("find key", in.gen, ErrUnsupportedKey, "%s has key type 0x%x; only RSA, EC and Ed25519 keys are supported", k.ref, o.keyType)
	}
	if err != nil {
		return nil, err
	}
	return k, nil
}

// isPublicHalf reports whether p is a public half of private key object o:
// a public key of o's key type with o's CKA_ID (or, for a key without one,
// o's CKA_LABEL, without an ID), the same curve for EC keys, the same
// modulus for RSA keys when o shows its own. A key with neither an ID nor a
// label has no public half that can be told from another key's.
func isPublicHalf(o, p *object) bool {
	if len(o.id) == 0 && o.label == "" {
		return false
	}
	if !p.hasClass || p.class != pkcs11.CKO_PUBLIC_KEY || !p.hasKeyType || !o.hasKeyType || p.keyType != o.keyType ||
		!bytes.Equal(p.id, o.id) || (len(o.id) == 0 && p.label != o.label) {
		return false
	}
	if o.keyType == pkcs11.CKK_RSA {
		return len(o.modulus) == 0 || bytes.Equal(o.modulus, p.modulus)
	}
	return sameCurve(o.keyType, p.ecParams, o.ecParams)
}

// publicHalf returns the one public half of private key object o
// (isPublicHalf). It looks among cands first, then finds it by class and
// CKA_ID (or label).
func (in *instance) publicHalf(s pkcs11.SessionHandle, o *object, cands []object) (*object, error) {
	var found []*object
	for i := range cands {
		if isPublicHalf(o, &cands[i]) {
			found = append(found, &cands[i])
		}
	}
	if len(found) == 0 {
		var err error
		if found, err = in.publicHalves(s, o); err != nil {
			return nil, err
		}
	}
	label := ""
	if len(o.id) == 0 {
		label = o.label
	}
	ref := KeyRef{ID: o.id, Label: label}
	switch len(found) {
	case 0:
		return nil, opErr("find key", in.gen, ErrKeyNotFound, "no public key object with %s for the private key", ref)
	case 1:
		return found[0], nil
	}
	return nil, opErr("find key", in.gen, ErrAmbiguousKey, "several public key objects with %s", ref)
}

// publicHalves finds every public half of private key object o.
func (in *instance) publicHalves(s pkcs11.SessionHandle, o *object) ([]*object, error) {
	if !o.hasKeyType || (len(o.id) == 0 && o.label == "") {
		return nil, nil
	}
	label := ""
	if len(o.id) == 0 {
		label = o.label
	}
	tmpl := append(refTemplate(pkcs11.CKO_PUBLIC_KEY, o.id, label), pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, o.keyType))
	handles, err := in.findObjects(s, tmpl, maxRefObjects)
	if err != nil {
		return nil, err
	}
	var found []*object
	for _, h := range handles {
		p, err := in.readObject(s, h)
		if err != nil {
			return nil, err
		}
		if isPublicHalf(o, &p) {
			found = append(found, &p)
		}
	}
	return found, nil
}

// sameCurve reports whether two CKA_EC_PARAMS name the same curve. Ed25519
// has two encodings, and a module may store one on a half and the other on
// the other (SoftHSM 2.6 turns the OID into the name on the private key).
func sameCurve(keyType uint, a, b []byte) bool {
	if keyType == ckkECEdwards && isEd25519Params(a) && isEd25519Params(b) {
		return true
	}
	return len(a) > 0 && bytes.Equal(a, b)
}

// rsaPublic sets k's public key: from the private key object, as most
// tokens expose the modulus and exponent there, else from its public half.
func (in *instance) rsaPublic(s pkcs11.SessionHandle, k *key, o *object, cands []object) error {
	src := o
	k.pubFromPriv = true
	if len(o.modulus) == 0 || len(o.exponent) == 0 {
		k.pubFromPriv = false
		p, err := in.publicHalf(s, o, cands)
		if err != nil {
			return err
		}
		src = p
	}
	n := new(big.Int).SetBytes(src.modulus)
	e := new(big.Int).SetBytes(src.exponent)
	if n.Sign() == 0 || !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 {
		return opErr("find key", in.gen, ErrUnsupportedKey, "RSA key %s has an unusable modulus or exponent", k.ref)
	}
	if n.BitLen() < 1024 {
		return opErr("find key", in.gen, ErrUnsupportedKey, "RSA key %s has %d bits; at least 1024 are required", k.ref, n.BitLen())
	}
	k.pub = &rsa.PublicKey{N: n, E: int(e.Int64())}
	k.size = (n.BitLen() + 7) / 8
	return nil
}

// ecPublic sets k's public key: the curve from the private key object, the
// point from its public half, or from a certificate with the same CKA_ID.
func (in *instance) ecPublic(s pkcs11.SessionHandle, k *key, o *object, cands []object) error {
	params := o.ecParams
	var curve elliptic.Curve
	var err error
	if k.kind == kindECDSA {
		if curve, err = curveOf(params); err != nil {
			return opErr("find key", in.gen, ErrUnsupportedKey, "%s: %v", k.ref, err)
		}
	} else if !isEd25519Params(params) {
		return opErr("find key", in.gen, ErrUnsupportedKey, "%s: Edwards curve parameters %x are not Ed25519 (Ed448 is not supported)", k.ref, params)
	}
	p, herr := in.publicHalf(s, o, cands)
	if herr != nil {
		if errors.Is(herr, ErrAmbiguousKey) || !errors.Is(herr, ErrKeyNotFound) {
			return herr
		}
		// No public key object: a certificate with the key's CKA_ID, if
		// the key proves it holds its private key.
		pub, cerr := in.certPublic(s, k)
		switch cerr.(type) {
		case nil:
			return k.setECPublic(pub)
		case *marked, *Error:
			return cerr // the session must not be pooled; the certificate is not the key's
		}
		if _, ok := codeOf(cerr); ok {
			return cerr // the module failed
		}
		return herr // no certificate either
	}
	pub, err := pointKey(curve, p.ecPoint)
	if err != nil {
		return opErr("find key", in.gen, ErrUnsupportedKey, "%s: %v", k.ref, err)
	}
	return k.setECPublic(pub)
}

// pointKey is the public key of CKA_EC_POINT v on curve, or, with curve
// nil, of Ed25519.
func pointKey(curve elliptic.Curve, v []byte) (crypto.PublicKey, error) {
	if curve == nil {
		point := ecPoint(v, ed25519.PublicKeySize)
		if len(point) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("Ed25519 public key is %d bytes, want 32", len(point))
		}
		return ed25519.PublicKey(bytes.Clone(point)), nil
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, ecPoint(v, 1+2*((curve.Params().BitSize+7)/8)))
	if err != nil {
		return nil, fmt.Errorf("public point: %v", err)
	}
	return pub, nil
}

// keysOnToken lists every private key: one find of the private keys, one
// read of each, and, when some key's public key is not on its private key
// object (EC and Ed25519 keys), one find of the public keys and one read of
// each. A key that cannot be used is listed with why.
func (in *instance) keysOnToken(s pkcs11.SessionHandle, max int) ([]KeyInfo, error) {
	privs, err := in.readAll(s, pkcs11.CKO_PRIVATE_KEY, max)
	if err != nil {
		return nil, err
	}
	var pubs map[string][]object
	for _, o := range privs {
		if o.hasKeyType && o.keyType != pkcs11.CKK_RSA || len(o.modulus) == 0 {
			all, err := in.readAll(s, pkcs11.CKO_PUBLIC_KEY, max)
			if err != nil {
				return nil, err
			}
			pubs = map[string][]object{}
			for _, p := range all {
				pubs[string(p.id)] = append(pubs[string(p.id)], p)
			}
			break
		}
	}
	out := make([]KeyInfo, 0, len(privs))
	for i := range privs {
		o := &privs[i]
		ref := KeyRef{ID: o.id, Label: o.label}
		k, err := in.keyFrom(s, o, pubs[string(o.id)])
		if err != nil {
			if _, active := err.(*marked); active {
				return nil, err
			}
			if code, ok := codeOf(err); ok && classify(code) != classCaller {
				return nil, err
			}
			out = append(out, KeyInfo{Ref: ref, Type: "unsupported: " + err.Error()})
			continue
		}
		out = append(out, KeyInfo{Ref: k.ref, Type: k.describe(), CanSign: k.canSign, CanDecrypt: k.canDecrypt, CanDerive: k.canDerive})
	}
	return out, nil
}

// readAll finds every object of class and reads it; more than max is an
// error.
func (in *instance) readAll(s pkcs11.SessionHandle, class uint, max int) ([]object, error) {
	handles, err := in.findObjects(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}, max)
	if err != nil {
		return nil, err
	}
	if len(handles) > max {
		return nil, opErr("list keys", in.gen, ErrUnsupportedKey, "more than %d objects of class %d on the token", max, class)
	}
	objs := make([]object, len(handles))
	for i, h := range handles {
		if objs[i], err = in.readObject(s, h); err != nil {
			return nil, err
		}
	}
	return objs, nil
}
