package hsm

import (
	"context"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/elliptic"
	cryptorand "crypto/rand"
	"crypto/subtle"
	"errors"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// Key agreement (ECDH): the capability of an EC private key with
// CKA_DERIVE, as an ecdh.KeyExchanger, on the three bindings (binding.go):
// KeyExchanger (one generation), DurableKeyExchanger and GroupKeyExchanger.
//
// One agreement is one task on a session of the key's generation, three
// PKCS#11 calls: C_DeriveKey (CKM_ECDH1_DERIVE, CKD_NULL, the peer's
// uncompressed point) makes the shared secret a session object
// (CKA_TOKEN false), a generic secret of the field's size, extractable and
// not sensitive; C_GetAttributeValue reads its CKA_VALUE; C_DestroyObject
// destroys it, on every path, errors included. When the destruction fails,
// the session is closed, which destroys the session's objects: the secret
// never outlives the call, and never becomes a token object.

// keyUse is what a key is looked up for: the checks of Signer, Decrypter
// or KeyExchanger (lookupFor), for durable and group keys.
type keyUse uint8

const (
	useSign keyUse = iota
	useDecrypt
	useDerive
)

// newDeriveRefusals are the refusals of a key agreement of generation gen:
// Op "ecdh", timed as "derive" in Stats.Latency.
func newDeriveRefusals(gen uint64) *refusals {
	r := newRefusals("ecdh", gen)
	r.lat = classDerive
	return r
}

// KeyExchanger looks up the EC private key ref in the current generation,
// as Signer does, and requires that it allows key agreement (CKA_DERIVE):
// P-256, P-384 or P-521. A key that does not sign proves it holds its
// public key's private key with one agreement of its own with an
// ephemeral key (the result must be crypto/ecdh's), as a signing key
// proves it with a signature: a mismatched pair is refused with
// ErrKeyMismatch. An RSA or Ed25519 key, or one without CKA_DERIVE, is
// refused with ErrUnsupportedKey. The key is bound to the current
// generation (see KeyExchanger); DurableKeyExchanger gives one that lasts.
// It makes a few PKCS#11 calls and may block as long as they do.
func (p *Provider) KeyExchanger(ref KeyRef) (*KeyExchanger, error) {
	k, err := p.lookup(ref)
	if err != nil {
		return nil, err
	}
	if err := k.exchanges("find key"); err != nil {
		return nil, err
	}
	return &KeyExchanger{k: k, pub: k.ecdhPublic()}, nil
}

// DurableKeyExchanger looks up ref now, as KeyExchanger does, proves that
// the private key is the public key's (unless the lookup proved it
// already), and pins the public key. Like DurableSigner it finds the key
// again, and proves it, in every new generation: a different key under
// the reference is refused with ErrKeyChanged, never used.
func (p *Provider) DurableKeyExchanger(ref KeyRef) (*DurableKeyExchanger, error) {
	d, err := p.durable(ref, useDerive)
	if err != nil {
		return nil, err
	}
	return &DurableKeyExchanger{d: d, pub: ecdhOf(d.pub)}, nil
}

// KeyExchanger finds ref on the group's healthy members, as Group.Signer
// does, with the checks of Provider.KeyExchanger.
func (g *Group) KeyExchanger(ref KeyRef) (*GroupKeyExchanger, error) {
	k, err := g.newKey(ref, useDerive, "group key exchanger")
	if err != nil {
		return nil, err
	}
	return &GroupKeyExchanger{k: k, pub: ecdhOf(k.pub)}, nil
}

// exchanges refuses, for op, a key that cannot agree keys.
func (k *key) exchanges(op string) error {
	if k.kind != kindECDSA {
		return opErr(op, k.gen, ErrUnsupportedKey, "%s is an %v key; only EC keys (P-256, P-384, P-521) agree keys", k.ref, k.kind)
	}
	if !k.canDerive {
		return opErr(op, k.gen, ErrUnsupportedKey, "%s does not allow key agreement (CKA_DERIVE is false)", k.ref)
	}
	return nil
}

// ecdhPublic is k's public key for crypto/ecdh.
func (k *key) ecdhPublic() *ecdh.PublicKey { return ecdhOf(k.pub) }

// ecdhOf is the crypto/ecdh form of an EC public key: nil for another.
func ecdhOf(pub crypto.PublicKey) *ecdh.PublicKey {
	e, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil
	}
	out, err := e.ECDH()
	if err != nil {
		return nil
	}
	return out
}

// curveOfPeer is pub's curve, nil for a nil key.
func curveOfPeer(pub *ecdh.PublicKey) ecdh.Curve {
	if pub == nil {
		return nil
	}
	return pub.Curve()
}

// ecdhCurve is the crypto/ecdh curve of an EC key, and its field's size
// in bytes: the length of a shared secret.
func ecdhCurve(pub crypto.PublicKey) (ecdh.Curve, int) {
	e, ok := pub.(*ecdsa.PublicKey)
	if !ok {
		return nil, 0
	}
	switch e.Curve {
	case elliptic.P256():
		return ecdh.P256(), 32
	case elliptic.P384():
		return ecdh.P384(), 48
	case elliptic.P521():
		return ecdh.P521(), 66
	}
	return nil, 0
}

// ecdh is the key-agreement capability: the shared secret of k and peer,
// the x-coordinate of the product, as ecdh.PrivateKey.ECDH returns it.
// Everything of the caller's is checked before the operation holds a
// session: a peer on another curve, or nil, is refused without a PKCS#11
// call (ErrInvalidOptions).
func (k *key) ecdh(peer *ecdh.PublicKey) ([]byte, error) {
	const op = "ecdh"
	if err := k.exchanges(op); err != nil {
		return nil, err
	}
	curve, size := ecdhCurve(k.pub)
	switch {
	case peer == nil:
		return nil, opErr(op, k.gen, ErrInvalidOptions, "the peer's public key is nil")
	case peer.Curve() != curve:
		return nil, opErr(op, k.gen, ErrInvalidOptions, "the peer's public key is on %v; %s is on %v", peer.Curve(), k.ref, curve)
	}
	return k.derive(peer.Bytes(), size)
}

// deriveHook, when set (by a test), runs between the derivation and the
// read of the secret; an error it returns fails the agreement there, as a
// failed read would.
var deriveHook atomic.Pointer[func() error]

// derive runs CKM_ECDH1_DERIVE with k and point (uncompressed, as the
// token takes it) on a session of k's generation, and returns the size
// bytes of the secret: C_DeriveKey, C_GetAttributeValue, C_DestroyObject.
func (k *key) derive(point []byte, size int) ([]byte, error) {
	const op = "ecdh"
	var secret []byte
	err := k.p.run(k.gen, k.deriveRefusals, k.p.cfg.SessionWaitTimeout, runOp, func(in *instance, s pkcs11.SessionHandle) error {
		mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, pkcs11.NewECDH1DeriveParams(pkcs11.CKD_NULL, nil, point))}
		h, err := in.ctx.DeriveKey(s, mech, k.handle, secretTemplate(size))
		if err != nil {
			return stepErr("C_DeriveKey", err)
		}
		if hook := deriveHook.Load(); hook != nil {
			err = (*hook)()
		}
		if err == nil {
			secret, err = in.readSecret(s, h)
		}
		if derr := in.ctx.DestroyObject(s, h); derr != nil {
			// The secret stays on the session until the session is
			// closed: close it.
			clear(secret)
			secret = nil
			return mayBeActive(errors.Join(err, stepErr("C_DestroyObject (the derived secret)", derr)))
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(secret) != size {
		clear(secret)
		return nil, opErr(op, k.gen, ErrUnsupportedKey, "%s: the token derived a %d-byte secret, want %d", k.ref, len(secret), size)
	}
	return secret, nil
}

// secretTemplate is the template of a derived secret of size bytes: a
// session object that can be read, and only for as long as the call
// lasts.
func secretTemplate(size int) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, size),
	}
}

// readSecret reads CKA_VALUE of the secret h: one call where the module's
// function list is validated, into a buffer wiped afterwards.
func (in *instance) readSecret(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) ([]byte, error) {
	vals, err := in.completeAttrs(s, h, []uint{pkcs11.CKA_VALUE})
	if err != nil {
		return nil, stepErr("C_GetAttributeValue (CKA_VALUE of the derived secret)", err)
	}
	out := make([]byte, len(vals[0]))
	copy(out, vals[0])
	clear(vals[0])
	return out, nil
}

// proveDerive proves a key that agrees keys against pub: its agreement
// with a fresh ephemeral key must equal crypto/ecdh's of the ephemeral
// key with pub.
func (k *key) proveDerive(pub crypto.PublicKey) (proved, error) {
	mine := ecdhOf(pub)
	curve, _ := ecdhCurve(k.pub)
	if mine == nil || curve == nil || mine.Curve() != curve {
		return provedMismatch, nil
	}
	eph, err := curve.GenerateKey(cryptorand.Reader)
	if err != nil {
		return provedMismatch, err
	}
	got, err := k.ecdh(eph.PublicKey())
	if err != nil {
		if uncheckable(err) {
			return provedUncheckable, nil
		}
		return provedMismatch, err
	}
	want, err := eph.ECDH(mine)
	if err != nil {
		return provedMismatch, err
	}
	defer clear(got)
	defer clear(want)
	if subtle.ConstantTimeCompare(got, want) == 1 {
		return provedMatch, nil
	}
	return provedMismatch, nil
}

// exchangeWith is the key-agreement capability on binding b: ECDH and
// ECDHContext of every kind.
func exchangeWith(b binding, kind string, ctx context.Context, wait bool, peer *ecdh.PublicKey) ([]byte, error) {
	if b == nil {
		return nil, errNoKey("ecdh", kind)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	if peer == nil {
		// Refused here, for every binding: nil is what marks an operation
		// that is not a key agreement.
		return nil, opErr("ecdh", 0, ErrInvalidOptions, "the peer's public key is nil")
	}
	return b.run(ctx, wait, operation{peer: peer})
}

// Compile-time checks: every key-agreement kind is an ecdh.KeyExchanger.
var (
	_ ecdh.KeyExchanger = (*KeyExchanger)(nil)
	_ ecdh.KeyExchanger = (*DurableKeyExchanger)(nil)
	_ ecdh.KeyExchanger = (*GroupKeyExchanger)(nil)
)

// KeyExchanger is an EC private key found in one generation, as an
// ecdh.KeyExchanger (crypto/hpke's hpke.NewDHKEMPrivateKey takes one).
// Like Signer it fails with ErrStaleKey after a re-initialization,
// without a PKCS#11 call. Safe for concurrent use.
type KeyExchanger struct {
	k   *key
	pub *ecdh.PublicKey
}

func (x *KeyExchanger) binding() binding {
	if x == nil || x.k == nil {
		return nil
	}
	return fixed{x.k}
}

// PublicKey returns the public key, for crypto/ecdh. It makes no PKCS#11
// call.
func (x *KeyExchanger) PublicKey() *ecdh.PublicKey {
	if x == nil {
		return nil
	}
	return x.pub
}

// Curve returns the key's curve: ecdh.P256(), ecdh.P384() or ecdh.P521().
func (x *KeyExchanger) Curve() ecdh.Curve { return curveOfPeer(x.PublicKey()) }

// Public returns the public key as the other kinds do: an
// *ecdsa.PublicKey. It makes no PKCS#11 call.
func (x *KeyExchanger) Public() crypto.PublicKey { return publicOfKey(x.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token.
func (x *KeyExchanger) KeyRef() KeyRef { return refOf(x.binding()) }

// Generation returns the generation of the PKCS#11 library the key was
// found in.
func (x *KeyExchanger) Generation() uint64 {
	if x == nil || x.k == nil {
		return 0
	}
	return x.k.gen
}

// String describes the key without secrets, e.g.
// `hsm.KeyExchanger{ECDSA P-256, label "kx" id 01, generation 2}`.
func (x *KeyExchanger) String() string { return describe(x.binding(), "KeyExchanger") }

// ECDH returns the shared secret of the key and peer, exactly as
// ecdh.PrivateKey.ECDH does: the x-coordinate, as long as the curve's
// field (32, 48 or 66 bytes). The token derives it (CKM_ECDH1_DERIVE,
// CKD_NULL) into a session object that is read and destroyed in the same
// call, on every path: three PKCS#11 calls (C_DeriveKey,
// C_GetAttributeValue, C_DestroyObject). A nil peer, or one on another
// curve, is refused without a PKCS#11 call (ErrInvalidOptions), as are a
// stale key (ErrStaleKey), an unavailable provider (ErrUnavailable) and a
// closed one (ErrClosed). It blocks like Signer.Sign. Every kind's ECDH
// agrees so. Safe for concurrent use.
func (x *KeyExchanger) ECDH(peer *ecdh.PublicKey) ([]byte, error) {
	if x == nil || x.k == nil {
		return nil, errNoKey("ecdh", "KeyExchanger")
	}
	return x.k.ecdh(peer)
}

// ECDHContext is ECDH under ctx, as Signer.SignContext is Sign.
func (x *KeyExchanger) ECDHContext(ctx context.Context, peer *ecdh.PublicKey) ([]byte, error) {
	return exchangeWith(x.binding(), "KeyExchanger", ctx, true, peer)
}

// DurableKeyExchanger is the key-agreement counterpart of DurableSigner:
// an ecdh.KeyExchanger that finds its key again, and proves it, in every
// generation, and never returns ErrStaleKey. Safe for concurrent use.
type DurableKeyExchanger struct {
	d   *durable
	pub *ecdh.PublicKey
}

func (x *DurableKeyExchanger) binding() binding {
	if x == nil || x.d == nil {
		return nil
	}
	return x.d
}

// PublicKey returns the pinned public key, for crypto/ecdh. It makes no
// PKCS#11 call.
func (x *DurableKeyExchanger) PublicKey() *ecdh.PublicKey {
	if x == nil {
		return nil
	}
	return x.pub
}

// Curve returns the key's curve.
func (x *DurableKeyExchanger) Curve() ecdh.Curve { return curveOfPeer(x.PublicKey()) }

// Public returns the pinned *ecdsa.PublicKey. It makes no PKCS#11 call.
func (x *DurableKeyExchanger) Public() crypto.PublicKey { return publicOfKey(x.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// (at first binding), by which it is found again.
func (x *DurableKeyExchanger) KeyRef() KeyRef { return refOf(x.binding()) }

// Generation returns the generation the key is currently bound in.
func (x *DurableKeyExchanger) Generation() uint64 {
	if x == nil || x.d == nil {
		return 0
	}
	return x.d.cur.Load().gen
}

// String describes the key without secrets.
func (x *DurableKeyExchanger) String() string {
	return describe(x.binding(), "DurableKeyExchanger")
}

// ECDH agrees as KeyExchanger.ECDH does, with the key bound in the
// current generation, failing fast while the provider is unavailable.
func (x *DurableKeyExchanger) ECDH(peer *ecdh.PublicKey) ([]byte, error) {
	return exchangeWith(x.binding(), "DurableKeyExchanger", context.Background(), false, peer)
}

// ECDHContext is ECDH under ctx, waiting for an unavailable provider until
// ctx ends, as DurableSigner.SignContext does.
func (x *DurableKeyExchanger) ECDHContext(ctx context.Context, peer *ecdh.PublicKey) ([]byte, error) {
	return exchangeWith(x.binding(), "DurableKeyExchanger", ctx, true, peer)
}

// GroupKeyExchanger is a group's EC private key as an ecdh.KeyExchanger:
// each agreement goes to a healthy member, and moves to another when the
// member fails because of its HSM. Safe for concurrent use.
type GroupKeyExchanger struct {
	k   *groupKey
	pub *ecdh.PublicKey
}

func (x *GroupKeyExchanger) binding() binding {
	if x == nil || x.k == nil {
		return nil
	}
	return x.k
}

// PublicKey returns the pinned public key, for crypto/ecdh. It makes no
// PKCS#11 call.
func (x *GroupKeyExchanger) PublicKey() *ecdh.PublicKey {
	if x == nil {
		return nil
	}
	return x.pub
}

// Curve returns the key's curve.
func (x *GroupKeyExchanger) Curve() ecdh.Curve { return curveOfPeer(x.PublicKey()) }

// Public returns the pinned *ecdsa.PublicKey. It makes no PKCS#11 call.
func (x *GroupKeyExchanger) Public() crypto.PublicKey { return publicOfKey(x.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// of the member whose public key was pinned.
func (x *GroupKeyExchanger) KeyRef() KeyRef { return refOf(x.binding()) }

// String describes the key without secrets.
func (x *GroupKeyExchanger) String() string { return describe(x.binding(), "GroupKeyExchanger") }

// ECDH agrees as KeyExchanger.ECDH does, on a healthy member, and fails
// over as GroupSigner.Sign does. A peer the token rejects is never tried
// on another member.
func (x *GroupKeyExchanger) ECDH(peer *ecdh.PublicKey) ([]byte, error) {
	return exchangeWith(x.binding(), "GroupKeyExchanger", context.Background(), false, peer)
}

// ECDHContext is ECDH under ctx, as GroupSigner.SignContext is Sign.
func (x *GroupKeyExchanger) ECDHContext(ctx context.Context, peer *ecdh.PublicKey) ([]byte, error) {
	return exchangeWith(x.binding(), "GroupKeyExchanger", ctx, true, peer)
}
