package hsm

import (
	"context"
	"crypto"
	"fmt"
)

// A key of this package is a capability (it signs; it decrypts, and signs)
// on a binding: how it reaches its private key on the token for each
// operation. The capabilities are written once, as methods of *key, the
// private key of one generation (signer.go, decrypter.go); the bindings
// are written once each, as the three implementations of binding:
//
//   - fixed: the key found in one generation (Signer, Decrypter). After a
//     re-initialization it is stale: ErrStaleKey, without a PKCS#11 call.
//   - *durable: a key that finds itself again, and proves it, in every
//     generation (DurableSigner, DurableDecrypter; durable.go).
//   - *groupKey: one key on the members of a Group, with failover
//     (GroupSigner, GroupDecrypter; groupkey.go).
//
// The exported kinds (keys.go) join the two: each method runs one
// capability through its kind's binding, with the meaning the package
// documentation gives it once for every kind.
type binding interface {
	// run runs f, the operation op, with the private key bound now. A ctx
	// already done makes no call. With wait, while the key's HSM is
	// unavailable, it waits for it until ctx ends; without, it fails fast
	// with ErrUnavailable.
	run(ctx context.Context, wait bool, op string, f func(*key) ([]byte, error)) ([]byte, error)
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

func (b fixed) run(ctx context.Context, wait bool, op string, f func(*key) ([]byte, error)) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, &Error{Op: op, Generation: b.k.gen, Err: causedBy(ErrUnavailable, err)}
	}
	if wait {
		if _, st := b.k.p.gate.load(); st == StateUnavailable || st == StateReinitializing {
			if err := b.k.p.WaitHealthy(ctx); err != nil {
				e := *err.(*Error)
				e.Op = op
				return nil, &e
			}
			// Healthy again: in a later generation, if it was re-initialized,
			// and then f fails with ErrStaleKey, without a call.
		}
	}
	return f(b.k)
}

func (b fixed) public() crypto.PublicKey { return b.k.pub }
func (b fixed) ownRef() KeyRef           { return b.k.ref }
func (b fixed) detached() bool           { return false }
func (b fixed) describe() string {
	return fmt.Sprintf("%s, %s, generation %d", b.k.describe(), b.k.ref, b.k.gen)
}

// run is do, with the key's own checks of ctx.
func (d *durable) run(ctx context.Context, wait bool, op string, f func(*key) ([]byte, error)) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, &Error{Op: op, Generation: d.p.Generation(), Err: causedBy(ErrUnavailable, err)}
	}
	return d.do(ctx, wait, op, f)
}

func (d *durable) public() crypto.PublicKey { return d.pub }
func (d *durable) ownRef() KeyRef           { return d.ref }
func (d *durable) detached() bool           { return false }
func (d *durable) describe() string {
	k := d.cur.Load()
	return fmt.Sprintf("%s, %s, generation %d", k.describe(), d.ref, k.gen)
}
