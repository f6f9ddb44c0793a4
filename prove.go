package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	cryptorand "crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
)

// Proof of possession (invariant 9). A token keeps a key's private and
// public halves as two objects: a lookup that reads the public key from
// the public object, or from a certificate, learns what the public object
// says, not what the private key is. Replace the private object alone and
// the same reference signs with another key, under the old Public(). So a
// key is proved before it signs or decrypts for anyone: a signature over a
// fresh random challenge must verify under the public key (or, for a key
// that only decrypts, a challenge encrypted to the public key must decrypt
// to itself; for a key that only agrees keys, its ECDH with a fresh
// ephemeral key must give what crypto/ecdh gives with the public key:
// proveDerive).
//
//   - A key whose public key is read from its own private object (an RSA
//     key whose private object shows CKA_MODULUS, as most do) needs no proof
//     at lookup: the token's private object says it itself.
//   - Every other key (EC, Ed25519, an RSA key that hides its modulus) is
//     proved once, at lookup.
//   - A durable key, and so a group's, is proved in every generation before
//     its first operation, whatever its type: what it binds to must be the
//     pinned key, and a failed proof is ErrKeyChanged.
//
// A proof costs one signature (or decryption) on the token.

// challengeLen is the length of a challenge, signed as a message.
const challengeLen = 32

// proved says what a proof found.
type proved int

const (
	provedMismatch    proved = iota // the private key is not pub's
	provedMatch                     // it is
	provedUncheckable               // the token refuses every challenge mechanism for the key
)

// prove checks that k's private key is the private key of pub, with one
// signature (or, for a key that does not sign, one decryption) of a
// random challenge on the token. provedUncheckable means the token
// refused the challenge's mechanisms (CKA_ALLOWED_MECHANISMS, say): such a
// key signs nothing with them either. Other errors are the operation's
// (the HSM lost, unavailable, stale).
func (k *key) prove(pub crypto.PublicKey) (proved, error) {
	k = k.asCheck()
	challenge := make([]byte, challengeLen)
	if _, err := cryptorand.Read(challenge); err != nil {
		return provedMismatch, err
	}
	if !k.canSign {
		if k.canDecrypt && k.kind == kindRSA {
			return k.proveDecrypt(pub, challenge)
		}
		if k.canDerive && k.kind == kindECDSA {
			return k.proveDerive(pub)
		}
		return provedUncheckable, nil
	}
	var err error
	for _, opts := range k.challengeOpts() {
		// Signed as a message: a key restricted to the token's
		// hash-and-sign mechanisms proves itself with them (message.go).
		var sig []byte
		if sig, err = k.signMessage(challenge, opts); err != nil {
			if uncheckable(err) {
				continue // the next mechanism
			}
			return provedMismatch, err
		}
		if verifies(pub, challenge, sig, opts) {
			return provedMatch, nil
		}
		return provedMismatch, nil
	}
	if k.canDecrypt && k.kind == kindRSA {
		return k.proveDecrypt(pub, challenge)
	}
	if k.canDerive && k.kind == kindECDSA {
		return k.proveDerive(pub)
	}
	return provedUncheckable, nil
}

// asCheck returns a copy of k whose operations count as the library's own
// checks in Stats.Latency ("check"), not as the caller's signatures or
// decryptions: a proof is made for a lookup or a binding. They count in
// Stats.Operations, as every operation on a session does.
func (k *key) asCheck() *key {
	c := *k
	c.signRefusals = newRefusals("prove key", k.gen)
	c.decryptRefusals = c.signRefusals
	c.deriveRefusals = c.signRefusals
	return &c
}

// challengeOpts are the signatures a challenge tries, in order.
func (k *key) challengeOpts() []crypto.SignerOpts {
	switch k.kind {
	case kindRSA:
		return []crypto.SignerOpts{crypto.SHA256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}}
	case kindEd25519:
		return []crypto.SignerOpts{crypto.Hash(0)}
	}
	return []crypto.SignerOpts{crypto.SHA256}
}

// verifies reports whether sig is pub's signature over the message
// challenge with opts (SHA-256, or none for Ed25519).
func verifies(pub crypto.PublicKey, challenge, sig []byte, opts crypto.SignerOpts) bool {
	digest := sha256.Sum256(challenge)
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(pub, digest[:], sig)
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, pss) == nil
		}
		return rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) == nil
	case ed25519.PublicKey:
		return ed25519.Verify(pub, challenge, sig)
	}
	return false
}

// proveDecrypt decrypts challenge, encrypted to pub (an RSA key) with OAEP
// SHA-256, else SHA-1, else PKCS #1 v1.5, whichever the token takes first.
func (k *key) proveDecrypt(pub crypto.PublicKey, challenge []byte) (proved, error) {
	rpub, ok := pub.(*rsa.PublicKey)
	if !ok {
		return provedMismatch, nil
	}
	encs := []struct {
		opts    crypto.DecrypterOpts
		encrypt func() ([]byte, error)
	}{
		{&rsa.OAEPOptions{Hash: crypto.SHA256}, func() ([]byte, error) {
			return rsa.EncryptOAEP(crypto.SHA256.New(), cryptorand.Reader, rpub, challenge, nil)
		}},
		{&rsa.OAEPOptions{Hash: crypto.SHA1}, func() ([]byte, error) {
			return rsa.EncryptOAEP(crypto.SHA1.New(), cryptorand.Reader, rpub, challenge, nil)
		}},
		{nil, func() ([]byte, error) {
			//lint:ignore SA1019 the last resort for a token that decrypts only PKCS #1 v1.5: the challenge is ours, and random.
			return rsa.EncryptPKCS1v15(cryptorand.Reader, rpub, challenge)
		}},
	}
	for _, e := range encs {
		ct, err := e.encrypt()
		if err != nil {
			return provedMismatch, err
		}
		pt, err := k.decryptWith(nil, ct, e.opts)
		switch {
		case err == nil:
			if bytes.Equal(pt, challenge) {
				return provedMatch, nil
			}
			return provedMismatch, nil
		case errors.Is(err, ErrDecryption):
			return provedMismatch, nil
		case !uncheckable(err):
			return provedMismatch, err
		}
	}
	return provedUncheckable, nil
}

// uncheckable reports whether err, from a challenge's signature or
// decryption, says the token refuses that mechanism or those parameters
// for the key, rather than that the operation failed: the caller's class
// of error (ErrInvalidOptions, a mechanism or key-function code), never a
// PIN error or a loss.
func uncheckable(err error) bool {
	if errors.Is(err, ErrInvalidOptions) || errors.Is(err, ErrUnsupportedKey) {
		return true
	}
	code, ok := codeOf(err)
	return ok && classify(code) == classCaller && !isPINCode(code)
}

// check proves k's private key against pub, and returns mismatch() when it
// is another key. A key the token will not let be challenged is let
// through, logged once per lookup: it signs nothing with the mechanisms the
// challenge tried, and an operation with another one is the caller's.
func (k *key) check(pub crypto.PublicKey, mismatch func() error) error {
	res, err := k.prove(pub)
	switch {
	case err != nil:
		return err
	case res == provedMismatch:
		return mismatch()
	case res == provedUncheckable:
		k.p.log.Warn("hsm: the key cannot be challenged (the token refuses the challenge's mechanisms for it); it is used unproved",
			"key", k.ref.String(), "generation", k.gen)
	}
	return nil
}

// needsProof reports whether a lookup must prove k: its public key came
// from another object than its private key, and nothing proved it yet.
func (k *key) needsProof() bool {
	return !k.proven && !k.pubFromPriv && (k.canSign || k.canDecrypt || k.canDerive)
}
