package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdh"
	"fmt"
	"io"
)

// A key of this package is a capability (it signs; it decrypts, and signs;
// it agrees keys, ECDH)
// on a binding: how it reaches its private key on the token for each
// operation. The capabilities are written once, as methods of *key, the
// private key of one generation (signer.go, decrypter.go); the bindings
// are written once each, as the three implementations of binding:
//
//   - fixed: the key found in one generation (Signer, Decrypter,
//     KeyExchanger). After a
//     re-initialization it is stale: ErrStaleKey, without a PKCS#11 call.
//   - *durable: a key that finds itself again, and proves it, in every
//     generation (DurableSigner, DurableDecrypter, DurableKeyExchanger;
//     durable.go).
//   - *groupKey: one key on the members of a Group, with failover
//     (GroupSigner, GroupDecrypter, GroupKeyExchanger; groupkey.go).
//
// The exported kinds (keys.go) join the two: each method runs one
// capability through its kind's binding, with the meaning the package
// documentation gives it once for every kind.
type binding interface {
	// run runs f, the operation op, with the private key bound now. A ctx
	// already done makes no call. With wait, while the key's HSM is
	// unavailable, it waits for it until ctx ends; without, it fails fast
	// with ErrUnavailable.
	run(ctx context.Context, wait bool, o operation) ([]byte, error)
	// public is the key's public key (pinned, for durable and group keys).
	public() crypto.PublicKey
	// ownRef is the key's own CKA_ID and CKA_LABEL, as read from the token.
	ownRef() KeyRef
	// describe says what String shows of the key, without secrets.
	describe() string
	// detached reports whether f may run on after run has returned (a
	// group's call abandoned on a member that hangs): the caller's inputs
	// must then be copied, and the caller's code (options' methods,
	// readers) run, before run.
	detached() bool
}

// fixed binds a key to the generation it was found in.
type fixed struct{ k *key }

func (b fixed) run(ctx context.Context, wait bool, o operation) ([]byte, error) {
	op := o.name()
	if err := ctx.Err(); err != nil {
		return nil, &Error{Op: op, Generation: b.k.gen, Err: causedBy(ErrUnavailable, err)}
	}
	if wait {
		if _, st := b.k.p.gate.load(); st == StateUnavailable || st == StateReinitializing {
			if err := b.k.p.waitHealthyFor(ctx, op); err != nil {
				return nil, err
			}
			// Healthy again: in a later generation, if it was re-initialized,
			// and then f fails with ErrStaleKey, without a call.
		}
	}
	return o.on(b.k)
}

func (b fixed) public() crypto.PublicKey { return b.k.pub }
func (b fixed) ownRef() KeyRef           { return b.k.ref }
func (b fixed) detached() bool           { return false }
func (b fixed) describe() string {
	return fmt.Sprintf("%s, %s, generation %d", b.k.describe(), b.k.ref, b.k.gen)
}

// run is do, with the key's own checks of ctx.
func (d *durable) run(ctx context.Context, wait bool, o operation) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, &Error{Op: o.name(), Generation: d.p.Generation(), Err: causedBy(ErrUnavailable, err)}
	}
	return d.do(ctx, wait, o.name(), o.on)
}

// operation is one capability's use with its inputs: what a binding runs
// on the key it binds. A value, not a closure, so that handing it through
// the binding interface allocates nothing.
type operation struct {
	decrypt bool // else sign, or derive
	// peer, when set, makes the operation a key agreement with it (ECDH,
	// ecdh.go): derive.
	peer    *ecdh.PublicKey
	message bool // sign input, a message, whole (SignMessage); else a digest
	input   []byte
	sign    crypto.SignerOpts
	dec     crypto.DecrypterOpts
	rand    io.Reader
	// random, when set, is what rand reads, whole, at each attempt (a
	// group's, whose attempts may run after the call returned).
	random []byte
}

func (o operation) name() string {
	if o.peer != nil {
		return "ecdh"
	}
	if o.decrypt {
		return "decrypt"
	}
	return "sign"
}

// on runs o with k.
func (o operation) on(k *key) ([]byte, error) {
	if o.peer != nil {
		return k.ecdh(o.peer)
	}
	if !o.decrypt {
		if o.message {
			return k.signMessage(o.input, o.sign)
		}
		return k.sign(o.input, o.sign)
	}
	r := o.rand
	if o.random != nil {
		r = bytes.NewReader(o.random)
	}
	return k.decryptWith(r, o.input, o.dec)
}

func (d *durable) public() crypto.PublicKey { return d.pub }
func (d *durable) ownRef() KeyRef           { return d.ref }
func (d *durable) detached() bool           { return false }
func (d *durable) describe() string {
	k := d.cur.Load()
	return fmt.Sprintf("%s, %s, generation %d", k.describe(), d.ref, k.gen)
}
