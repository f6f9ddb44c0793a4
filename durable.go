package hsm

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"sync"
	"sync/atomic"
)

// durable is a private key that finds itself again in every generation.
type durable struct {
	p      *Provider
	ref    KeyRef // the key's own CKA_ID and CKA_LABEL, read at first binding
	pub    crypto.PublicKey
	pinned string // the first 8 bytes of the SHA-256 of the pinned public key, in hex, for messages
	use    keyUse // what it is found for: Signer's, Decrypter's or KeyExchanger's checks

	cur atomic.Pointer[key] // the key bound in some generation

	mu sync.Mutex // protects following fields, and serializes re-binding: one lookup per generation
	// changedGen is the generation in which the key behind the reference
	// was found to be another key; calls in it fail fast.
	changedGen uint64
	changedErr error

	// Refusals while the key cannot be bound, built once.
	unavailable, closed error
}

// lookupFor finds ref with the checks of Decrypter, KeyExchanger or
// Signer, as use says.
func (p *Provider) lookupFor(ref KeyRef, use keyUse) (*key, error) {
	switch use {
	case useDerive:
		x, err := p.KeyExchanger(ref)
		if err != nil {
			return nil, err
		}
		return x.k, nil
	case useDecrypt:
		d, err := p.Decrypter(ref)
		if err != nil {
			return nil, err
		}
		return d.k, nil
	}
	s, err := p.Signer(ref)
	if err != nil {
		return nil, err
	}
	return s.k, nil
}

func (p *Provider) durable(ref KeyRef, use keyUse) (*durable, error) {
	k, err := p.lookupFor(ref, use)
	if err != nil {
		return nil, err
	}
	return p.durableFrom(k, use)
}

// durableFrom makes a durable key of k, found with the checks of use
// (lookupFor), and pins its public key, after proving
// that k's private key is that key's (a key the lookup proved already is
// not asked again).
func (p *Provider) durableFrom(k *key, use keyUse) (*durable, error) {
	der, err := x509.MarshalPKIXPublicKey(k.pub)
	if err != nil {
		return nil, opErr("find key", k.gen, ErrUnsupportedKey, "public key: %v", err)
	}
	if !k.proven {
		err := k.check(k.pub, func() error {
			return opErr("bind key", k.gen, ErrKeyMismatch, "%s: a signature of a random challenge does not verify under its public key: the pair is refused", k.ref)
		})
		if err != nil {
			return nil, err
		}
	}
	sum := sha256.Sum256(der)
	d := &durable{p: p, ref: k.ref, pub: k.pub, pinned: hex.EncodeToString(sum[:8]), use: use,
		unavailable: &Error{Op: "bind key", Err: ErrUnavailable},
		closed:      &Error{Op: "bind key", Err: ErrClosed},
	}
	d.cur.Store(k)
	return d, nil
}

// bound returns the key bound in the provider's current generation,
// finding it again (once per generation) if the one held is older. The
// key it binds has the pinned public key and has proved, with a challenge
// under the pinned public key, that its private key is the pinned key's:
// every key d.cur holds has.
func (d *durable) bound() (*key, error) {
	k := d.cur.Load()
	gen, st := d.p.gate.load()
	switch {
	case k.gen == gen:
		return k, nil // the operation itself reports unavailable or closed
	case st == StateClosed:
		return nil, d.closed
	case st != StateHealthy:
		return nil, d.unavailable // never ErrStaleKey from a durable key
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if k = d.cur.Load(); k.gen == gen {
		return k, nil // bound by a concurrent caller
	}
	if d.changedGen == gen {
		return nil, d.changedErr
	}
	nk, err := d.p.lookupFor(d.ref, d.use)
	switch {
	case errors.Is(err, ErrKeyMismatch):
		// The public key object may still be the pinned key's: the
		// private key is not.
		return nil, d.changed(gen, &Error{Op: "bind key", Generation: gen,
			Err: causedBy(wrapf(ErrKeyChanged, "%s (pinned SHA-256 %s...)", d.ref, d.pinned), err)})
	case err != nil:
		return nil, err
	case !samePublic(nk.pub, d.pub):
		return nil, d.changed(nk.gen, opErr("bind key", nk.gen, ErrKeyChanged,
			"%s now has another public key than the one pinned (SHA-256 %s...): refusing it", d.ref, d.pinned))
	case !nk.proven:
		// The public key is the private key object's own (RSA): prove the
		// private key all the same, against the pin.
		err := nk.check(d.pub, func() error {
			return d.changed(nk.gen, opErr("bind key", nk.gen, ErrKeyChanged,
				"%s: the private key is not the pinned key (SHA-256 %s...): a signature of a random challenge does not verify under it; refusing it", d.ref, d.pinned))
		})
		if err != nil {
			return nil, err
		}
	}
	d.cur.Store(nk)
	return nk, nil
}

// changed records err, a refusal of the key found in generation gen as
// another key than the pinned one, so that calls in that generation fail
// fast, and returns it. Called with d.mu held.
func (d *durable) changed(gen uint64, err error) error {
	d.changedGen, d.changedErr = gen, err
	d.p.log.Error("hsm: durable key refused: the key on the token changed", "key", d.ref.String(), "generation", gen, "err", err)
	return err
}

// maxRebinds bounds how many times in a row one call of a durable key binds
// it again because it turned stale between binding and the call (a
// re-initialization in between each time). Past it the call fails with
// ErrUnavailable: re-initializations follow one another too fast to sign.
const maxRebinds = 3

// do runs f, the operation op, with the key bound in the current
// generation. A key that turns stale between binding and the call is bound
// again, at most maxRebinds times. With wait, an unavailable provider is
// waited for, until ctx ends.
func (d *durable) do(ctx context.Context, wait bool, op string, f func(*key) ([]byte, error)) ([]byte, error) {
	if d == nil {
		return nil, errNoKey(op, "durable key")
	}
	for rebinds := 0; ; rebinds++ {
		k, err := d.bound()
		var out []byte
		if err == nil {
			out, err = f(k)
		}
		switch {
		case err == nil:
			return out, nil
		case errors.Is(err, ErrStaleKey):
			// Re-initialized between binding and the call: bind again. A
			// durable key never reports ErrStaleKey.
			if rebinds < maxRebinds {
				continue
			}
			err = d.unavailable
		}
		if !wait || !errors.Is(err, ErrUnavailable) {
			return nil, err
		}
		if err := d.p.waitHealthyFor(ctx, op); err != nil {
			return nil, err
		}
	}
}

// DurableSigner looks up ref now, as Signer does, proves that the private
// key is the public key's (one signature of a random challenge, for every
// key type, unless the lookup proved it already), and pins the public key.
// It returns the key an application should hold: see DurableSigner.
func (p *Provider) DurableSigner(ref KeyRef) (*DurableSigner, error) {
	d, err := p.durable(ref, useSign)
	if err != nil {
		return nil, err
	}
	return &DurableSigner{d}, nil
}

// DurableDecrypter looks up the RSA key ref now, as Decrypter does, proves
// it as DurableSigner does (by a decryption, for a key that does not
// sign), and pins its public key.
func (p *Provider) DurableDecrypter(ref KeyRef) (*DurableDecrypter, error) {
	d, err := p.durable(ref, useDecrypt)
	if err != nil {
		return nil, err
	}
	return &DurableDecrypter{d}, nil
}
