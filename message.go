package hsm

import (
	"crypto"
	"crypto/rsa"
)

// Message signing (crypto.MessageSigner): SignMessage gets the whole
// message, as crypto/tls and crypto/x509 hand it over (through
// crypto.SignMessage). Ed25519 signs it as Sign does; an RSA or ECDSA key
// hashes it here, with opts.HashFunc(), and signs the digest exactly as
// Sign does: the two-call path, and only a digest on the wire.

// signMessage is SignMessage of every kind. Bad input is refused without
// a PKCS#11 call.
func (k *key) signMessage(msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	const op = "sign"
	if !k.canSign {
		return nil, opErr(op, k.gen, ErrUnsupportedKey, "%s does not allow signing (CKA_SIGN is false)", k.ref)
	}
	if isNil(opts) {
		return nil, &Error{Op: op, Generation: k.gen, Err: errOpts("opts is %s: pass the hash to sign the message with (e.g. crypto.SHA256), *rsa.PSSOptions, or crypto.Hash(0) for Ed25519", nilName(opts))}
	}
	if k.kind == kindEd25519 {
		return k.sign(msg, opts) // the message, whole, as Sign signs it
	}
	h, err := k.messageHash(opts)
	if err != nil {
		return nil, &Error{Op: op, Generation: k.gen, Err: err}
	}
	if !h.Available() {
		return nil, &Error{Op: op, Generation: k.gen, Err: errOpts("hash %v is not linked into the program: import its package", h)}
	}
	w := h.New()
	w.Write(msg)
	return k.sign(w.Sum(nil), opts)
}

// messageHash is the hash of a message signature with opts (not nil) by
// k, an RSA or ECDSA key.
func (k *key) messageHash(opts crypto.SignerOpts) (crypto.Hash, error) {
	var h crypto.Hash
	if pss, ok := opts.(*rsa.PSSOptions); ok && k.kind == kindRSA {
		h = pss.Hash
	} else {
		var err error
		if h, err = hashFunc(opts); err != nil {
			return 0, err
		}
	}
	if h == 0 {
		// crypto.MessageSigner: "SignMessage should only accept a zero
		// opts.HashFunc if the Signer would also accept messages which
		// are not pre-hashed"; an RSA or ECDSA key's Sign takes only a
		// digest (made by the caller, with crypto.Hash(0)).
		return 0, errOpts("opts.HashFunc() is 0: SignMessage hashes the message with it (an %v key signs only digests): name the hash, e.g. crypto.SHA256, or *rsa.PSSOptions with Hash", k.kind)
	}
	if _, ok := hashSize(h); !ok {
		return 0, errOpts("hash %v is not supported", h)
	}
	return h, nil
}
