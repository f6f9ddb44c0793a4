package hsm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"io"
)

// The six kinds of key, and the one vocabulary they share (the package
// documentation, "Choosing a key", says it for users). Each method below runs one
// capability, written once (sign, decrypt), through its kind's binding
// (binding.go).

// ContextSigner is a crypto.Signer that can also sign under a context:
// every signing key of this package implements it (Signer, Decrypter,
// DurableSigner, DurableDecrypter, GroupSigner, GroupDecrypter). SignContext
// is Sign, except that a ctx already done makes no call, and that while the
// key's HSM is unavailable it waits for it until ctx ends instead of
// failing fast.
//
// Every signing key also has SignMessage (crypto.MessageSigner) and
// SignMessageContext, which ContextSigner leaves out on purpose: code
// that upgrades any crypto.Signer to a ContextSigner to pass a context
// (hsmjwt does) keeps working with signers of its own that have
// SignContext only.
type ContextSigner interface {
	crypto.Signer
	SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error)
}

// messageSigner is the rest of a signing key's vocabulary.
type messageSigner interface {
	crypto.MessageSigner
	SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error)
}

// ContextDecrypter is a crypto.Decrypter that can also decrypt under a
// context, and sign: every decrypting key of this package implements it
// (Decrypter, DurableDecrypter, GroupDecrypter). DecryptContext is to
// Decrypt what SignContext is to Sign.
type ContextDecrypter interface {
	ContextSigner
	Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error)
	DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error)
}

// Compile-time checks: every kind speaks the vocabulary.
var (
	_ messageSigner = (*Signer)(nil) // crypto.MessageSigner, and SignMessageContext
	_ messageSigner = (*Decrypter)(nil)
	_ messageSigner = (*DurableSigner)(nil)
	_ messageSigner = (*DurableDecrypter)(nil)
	_ messageSigner = (*GroupSigner)(nil)
	_ messageSigner = (*GroupDecrypter)(nil)

	_ ContextSigner    = (*Signer)(nil)
	_ ContextSigner    = (*DurableSigner)(nil)
	_ ContextSigner    = (*GroupSigner)(nil)
	_ ContextDecrypter = (*Decrypter)(nil)
	_ ContextDecrypter = (*DurableDecrypter)(nil)
	_ ContextDecrypter = (*GroupDecrypter)(nil)
)

// signWith is the signing capability on binding b, over a digest: Sign
// (ctx background, no wait) and SignContext of every kind. kind names the
// kind in the error for a nil or zero key.
func signWith(b binding, kind string, ctx context.Context, wait bool, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signOn(b, kind, ctx, wait, operation{input: digest, sign: opts})
}

// signMessageWith is the signing capability on binding b, over a whole
// message: SignMessage and SignMessageContext of every kind.
func signMessageWith(b binding, kind string, ctx context.Context, wait bool, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signOn(b, kind, ctx, wait, operation{message: true, input: msg, sign: opts})
}

// signOn runs o, a signature, on binding b.
func signOn(b binding, kind string, ctx context.Context, wait bool, o operation) ([]byte, error) {
	if b == nil {
		return nil, errNoKey("sign", kind)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	if b.detached() {
		own, err := ownSignerOpts(o.sign)
		if err != nil {
			return nil, err
		}
		o.sign, o.input = own, bytes.Clone(o.input)
	}
	return b.run(ctx, wait, o)
}

// decryptWith is the decrypting capability on binding b: Decrypt and
// DecryptContext of every kind.
func decryptWith(b binding, kind string, ctx context.Context, wait bool, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if b == nil {
		return nil, errNoKey("decrypt", kind)
	}
	if ctx == nil {
		ctx = context.Background()
	}
	o := operation{decrypt: true, input: ciphertext, dec: opts, rand: rand}
	if b.detached() {
		maxLen := 0
		if pub, ok := b.public().(*rsa.PublicKey); ok {
			maxLen = pub.Size() - 11
		}
		own, random, err := ownDecrypterOpts(rand, opts, maxLen)
		if err != nil {
			return nil, err
		}
		o = operation{decrypt: true, input: bytes.Clone(ciphertext), dec: own, random: random}
	}
	return b.run(ctx, wait, o)
}

// describe is what String says of a key of kind on b.
func describe(b binding, kind string) string {
	if b == nil {
		return "hsm." + kind + "{no key}"
	}
	return "hsm." + kind + "{" + b.describe() + "}"
}

// publicOf is Public of a key on b: nil for a nil or zero key.
func publicOfKey(b binding) crypto.PublicKey {
	if b == nil {
		return nil
	}
	return b.public()
}

// refOf is KeyRef of a key on b: the zero KeyRef for a nil or zero key.
func refOf(b binding) KeyRef {
	if b == nil {
		return KeyRef{}
	}
	return b.ownRef()
}

// Signer is a private key found in one generation of the PKCS#11 library,
// as a crypto.Signer (ContextSigner) with the semantics of crypto/rsa,
// crypto/ecdsa and crypto/ed25519. Once the provider has moved to a later
// generation it fails with ErrStaleKey and makes no PKCS#11 call: look it up
// again, or hold a DurableSigner instead. Safe for concurrent use.
type Signer struct{ k *key }

func (s *Signer) binding() binding {
	if s == nil || s.k == nil {
		return nil
	}
	return fixed{s.k}
}

// Public returns the public key: *rsa.PublicKey, *ecdsa.PublicKey or
// ed25519.PublicKey. It makes no PKCS#11 call.
func (s *Signer) Public() crypto.PublicKey { return publicOfKey(s.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token.
func (s *Signer) KeyRef() KeyRef { return refOf(s.binding()) }

// Generation returns the generation of the PKCS#11 library the key was found
// in.
func (s *Signer) Generation() uint64 {
	if s == nil || s.k == nil {
		return 0
	}
	return s.k.gen
}

// String describes the key without secrets, e.g.
// `hsm.Signer{ECDSA P-256, label "tls" id 01, generation 2}`.
func (s *Signer) String() string { return describe(s.binding(), "Signer") }

// Sign signs digest with the key, exactly as crypto.Signer defines:
//   - RSA: PKCS #1 v1.5 over the digest of opts.HashFunc() (crypto.Hash(0)
//     signs the input as given, as rsa.SignPKCS1v15 does), or RSASSA-PSS when
//     opts is *rsa.PSSOptions (rsa.PSSSaltLengthAuto, PSSSaltLengthEqualsHash
//     or an explicit salt length).
//   - ECDSA: the signature in ASN.1 DER, as ecdsa.SignASN1 produces. When
//     opts.HashFunc() is not zero the digest must have its length.
//   - Ed25519: digest is the whole message and opts.HashFunc() must be 0;
//     Ed25519ph and Ed25519ctx are not supported.
//
// rand is ignored: the token uses its own generator. Sign fails without any
// PKCS#11 call when opts is nil or does not fit the key or digest
// (ErrInvalidOptions), when the key may sign only with the token's
// hash-and-sign mechanisms (CKA_ALLOWED_MECHANISMS), which take the whole
// message: ErrUnsupportedKey, and SignMessage signs it, when the key is stale (ErrStaleKey), the provider
// unavailable (ErrUnavailable) or closed (ErrClosed). It blocks for the
// duration of the PKCS#11 calls (two, C_SignInit and C_Sign), and up to
// Config.SessionWaitTimeout for a free session. Every kind's Sign signs so.
// Safe for concurrent use.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if s == nil || s.k == nil {
		return nil, errNoKey("sign", "Signer")
	}
	return s.k.sign(digest, opts) // the hot path, without a binding
}

// SignContext is Sign under ctx: a ctx already done makes no call; while
// the provider is unavailable or re-initializing, it waits for it until ctx
// ends (then an error matching ErrUnavailable and ctx's error). A
// generation-bound key that waited through a re-initialization is stale:
// ErrStaleKey.
func (s *Signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(s.binding(), "Signer", ctx, true, digest, opts)
}

// SignMessage signs msg whole, as crypto.MessageSigner defines it: the
// signature Sign makes of msg's digest under opts.HashFunc() (for RSA-PSS,
// *rsa.PSSOptions.Hash), which verifies the same. crypto/x509 and
// crypto/tls sign so (through crypto.SignMessage). Ed25519 signs msg as
// Sign does (opts.HashFunc() 0). An RSA or ECDSA key hashes msg: a zero
// opts.HashFunc() is refused (ErrInvalidOptions), as is a hash PKCS#11 or
// this program cannot sign with.
//
// The message is hashed here and the digest signed as Sign signs it
// (CKM_RSA_PKCS, CKM_RSA_PKCS_PSS, CKM_ECDSA: only the digest goes to the
// token), unless the key may not use that mechanism: its
// CKA_ALLOWED_MECHANISMS leaves it out (read at lookup), or the token
// refused it for the key once in this generation. Then the token's
// hash-and-sign mechanism for the hash signs the whole message
// (CKM_SHA256_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS, CKM_ECDSA_SHA256, and
// the same for SHA-1, SHA-224, SHA-384 and SHA-512), if the key may use
// it; else ErrInvalidOptions says what the key allows. Either way two
// PKCS#11 calls, and refusals, blocking and concurrency are Sign's.
func (s *Signer) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if s == nil || s.k == nil {
		return nil, errNoKey("sign", "Signer")
	}
	return s.k.signMessage(msg, opts)
}

// SignMessageContext is SignMessage under ctx, as SignContext is Sign.
func (s *Signer) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(s.binding(), "Signer", ctx, true, msg, opts)
}

// Decrypter is an RSA private key found in one generation, as a
// crypto.Decrypter (ContextDecrypter) with the semantics of crypto/rsa, and
// a Signer. Like Signer it fails with ErrStaleKey after a
// re-initialization. Safe for concurrent use.
type Decrypter struct{ k *key }

func (d *Decrypter) binding() binding {
	if d == nil || d.k == nil {
		return nil
	}
	return fixed{d.k}
}

// Public returns the *rsa.PublicKey. It makes no PKCS#11 call.
func (d *Decrypter) Public() crypto.PublicKey { return publicOfKey(d.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token.
func (d *Decrypter) KeyRef() KeyRef { return refOf(d.binding()) }

// Generation returns the generation of the PKCS#11 library the key was
// found in.
func (d *Decrypter) Generation() uint64 {
	if d == nil || d.k == nil {
		return 0
	}
	return d.k.gen
}

// String describes the key without secrets.
func (d *Decrypter) String() string { return describe(d.binding(), "Decrypter") }

// Sign signs as Signer.Sign does; the key must allow signing (CKA_SIGN).
func (d *Decrypter) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "Decrypter", context.Background(), false, digest, opts)
}

// SignContext signs as Signer.SignContext does.
func (d *Decrypter) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "Decrypter", ctx, true, digest, opts)
}

// SignMessage signs msg as Signer.SignMessage does.
func (d *Decrypter) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "Decrypter", context.Background(), false, msg, opts)
}

// SignMessageContext signs msg as Signer.SignMessageContext does.
func (d *Decrypter) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "Decrypter", ctx, true, msg, opts)
}

// Decrypt decrypts ciphertext exactly as rsa.PrivateKey.Decrypt defines:
//   - opts nil or *rsa.PKCS1v15DecryptOptions: RSAES-PKCS1-v1_5. The token
//     does the raw RSA operation (CKM_RSA_X_509) and the padding is checked
//     here in constant time, as crypto/rsa does: a ciphertext with bad
//     padding takes the same two PKCS#11 calls and the same path as a good
//     one (no session closed, no probe, no log line). With SessionKeyLen >
//     0, a ciphertext that does not decrypt to a key of that length yields
//     SessionKeyLen random bytes (read from rand, or crypto/rand when rand
//     is nil) and no error, as rsa.DecryptPKCS1v15SessionKey does, so that
//     the caller does not become a padding oracle. Only where the token
//     refuses raw RSA for the key does it go through the token's
//     CKM_RSA_PKCS, and then how the token handles a bad ciphertext (its
//     time, its error, a session that must be closed) shows.
//   - *rsa.OAEPOptions: RSAES-OAEP with Hash, MGFHash (zero means Hash) and
//     Label; SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512, and SHA-512/224
//     and SHA-512/256 (for Hash or MGFHash), which PKCS#11 has no OAEP
//     parameters for, through the token's raw RSA only. When the token's
//     CKM_RSA_PKCS_OAEP refuses these parameters (SoftHSM 2.6 takes only
//     SHA-1 without a label), or a label is given, the token does the raw
//     RSA operation (CKM_RSA_X_509) and the OAEP padding is checked here in
//     constant time. The choice is remembered for the generation.
//
// The ciphertext must be exactly as long as the modulus. A ciphertext the
// token or the padding check rejects gives an error matching ErrDecryption;
// when the token rejected it, the error keeps the token's code (Error.Code),
// since modules report real failures with those codes too.
// Refusals (ErrInvalidOptions, ErrStaleKey, ErrUnavailable, ErrClosed) make
// no PKCS#11 call. Blocks like Sign. Every kind's Decrypt decrypts so.
// Safe for concurrent use.
func (d *Decrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if d == nil || d.k == nil {
		return nil, errNoKey("decrypt", "Decrypter")
	}
	return d.k.decryptWith(rand, ciphertext, opts)
}

// DecryptContext is Decrypt under ctx, as SignContext is Sign.
func (d *Decrypter) DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return decryptWith(d.binding(), "Decrypter", ctx, true, rand, ciphertext, opts)
}

// DurableSigner is a private key that an application can hold for as long
// as the Provider lives: in every new generation it finds the key again
// (same CKA_CLASS, CKA_ID and CKA_LABEL, exactly one match, the public key
// pinned at first binding) and proves, with a signature of a random
// challenge that must verify under the pinned public key, that the private
// key is the pinned one, before its first use, once per generation. Between
// re-initializations the hot path is one atomic load. A different key
// under the same reference is refused with ErrKeyChanged, never used. It
// never returns ErrStaleKey. Safe for concurrent use.
type DurableSigner struct{ d *durable }

func (s *DurableSigner) binding() binding {
	if s == nil || s.d == nil {
		return nil
	}
	return s.d
}

// Public returns the pinned public key. It makes no PKCS#11 call.
func (s *DurableSigner) Public() crypto.PublicKey { return publicOfKey(s.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// (at first binding), by which it is found again.
func (s *DurableSigner) KeyRef() KeyRef { return refOf(s.binding()) }

// Generation returns the generation the key is currently bound in.
func (s *DurableSigner) Generation() uint64 {
	if s == nil || s.d == nil {
		return 0
	}
	return s.d.cur.Load().gen
}

// String describes the key without secrets.
func (s *DurableSigner) String() string { return describe(s.binding(), "DurableSigner") }

// Sign signs as Signer.Sign does, with the key bound in the current
// generation. It does not wait for an unavailable provider: it fails fast
// with ErrUnavailable (SignContext waits).
func (s *DurableSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(s.binding(), "DurableSigner", context.Background(), false, digest, opts)
}

// SignContext is Sign under ctx: a ctx already done makes no call; while
// the provider is unavailable or re-initializing, it waits for it to be
// healthy again, until ctx ends (then an error matching both ErrUnavailable
// and ctx's error), and signs with the key bound in the new generation.
func (s *DurableSigner) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(s.binding(), "DurableSigner", ctx, true, digest, opts)
}

// SignMessage signs msg as Signer.SignMessage does, with the key bound in
// the current generation, failing fast while the provider is unavailable.
func (s *DurableSigner) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(s.binding(), "DurableSigner", context.Background(), false, msg, opts)
}

// SignMessageContext is SignMessage under ctx, waiting for an unavailable
// provider until ctx ends, as SignContext does.
func (s *DurableSigner) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(s.binding(), "DurableSigner", ctx, true, msg, opts)
}

// DurableDecrypter is the RSA counterpart of DurableSigner: a
// crypto.Decrypter (ContextDecrypter) and signer that finds its key again,
// and proves it, in every generation. Safe for concurrent use.
type DurableDecrypter struct{ d *durable }

func (d *DurableDecrypter) binding() binding {
	if d == nil || d.d == nil {
		return nil
	}
	return d.d
}

// Public returns the pinned *rsa.PublicKey. It makes no PKCS#11 call.
func (d *DurableDecrypter) Public() crypto.PublicKey { return publicOfKey(d.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// (at first binding), by which it is found again.
func (d *DurableDecrypter) KeyRef() KeyRef { return refOf(d.binding()) }

// Generation returns the generation the key is currently bound in.
func (d *DurableDecrypter) Generation() uint64 {
	if d == nil || d.d == nil {
		return 0
	}
	return d.d.cur.Load().gen
}

// String describes the key without secrets.
func (d *DurableDecrypter) String() string { return describe(d.binding(), "DurableDecrypter") }

// Sign signs as DurableSigner.Sign does; the key must allow signing.
func (d *DurableDecrypter) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "DurableDecrypter", context.Background(), false, digest, opts)
}

// SignContext signs as DurableSigner.SignContext does.
func (d *DurableDecrypter) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "DurableDecrypter", ctx, true, digest, opts)
}

// SignMessage signs msg as DurableSigner.SignMessage does.
func (d *DurableDecrypter) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "DurableDecrypter", context.Background(), false, msg, opts)
}

// SignMessageContext signs msg as DurableSigner.SignMessageContext does.
func (d *DurableDecrypter) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "DurableDecrypter", ctx, true, msg, opts)
}

// Decrypt decrypts as Decrypter.Decrypt does, with the key bound in the
// current generation, failing fast while the provider is unavailable.
func (d *DurableDecrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return decryptWith(d.binding(), "DurableDecrypter", context.Background(), false, rand, ciphertext, opts)
}

// DecryptContext is Decrypt under ctx, waiting for an unavailable provider
// until ctx ends, as SignContext does.
func (d *DurableDecrypter) DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return decryptWith(d.binding(), "DurableDecrypter", ctx, true, rand, ciphertext, opts)
}

// GroupSigner is a group's private key as a crypto.Signer (ContextSigner):
// each operation goes to a healthy member, and moves to another when the
// member fails because of its HSM. Safe for concurrent use.
type GroupSigner struct{ k *groupKey }

func (s *GroupSigner) binding() binding {
	if s == nil || s.k == nil {
		return nil
	}
	return s.k
}

// Public returns the pinned public key. It makes no PKCS#11 call.
func (s *GroupSigner) Public() crypto.PublicKey { return publicOfKey(s.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// of the member whose public key was pinned. Every member is asked with the
// reference given to Group.Signer.
func (s *GroupSigner) KeyRef() KeyRef { return refOf(s.binding()) }

// String describes the key without secrets.
func (s *GroupSigner) String() string { return describe(s.binding(), "GroupSigner") }

// Sign signs as Signer.Sign does, on a healthy member; if the member fails
// (its HSM lost, unavailable, busy or not answering), on another. Bad
// input fails at once (ErrInvalidOptions). With no member left it fails
// with ErrUnavailable, at once when no member is healthy. A member's
// answer is waited for up to its Config.ProbeTimeout.
func (s *GroupSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(s.binding(), "GroupSigner", context.Background(), false, digest, opts)
}

// SignContext is Sign under ctx: a ctx already done makes no call, ctx also
// bounds the wait for a member's answer, and while no member can sign it
// waits, until ctx ends, for a change of a member's state, then tries
// again.
func (s *GroupSigner) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(s.binding(), "GroupSigner", ctx, true, digest, opts)
}

// SignMessage signs msg as Signer.SignMessage does, on a healthy member,
// and fails over as Sign does.
func (s *GroupSigner) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(s.binding(), "GroupSigner", context.Background(), false, msg, opts)
}

// SignMessageContext is SignMessage under ctx, as SignContext is Sign.
func (s *GroupSigner) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(s.binding(), "GroupSigner", ctx, true, msg, opts)
}

// GroupDecrypter is a group's RSA private key as a crypto.Decrypter
// (ContextDecrypter), and a signer. Safe for concurrent use.
type GroupDecrypter struct{ k *groupKey }

func (d *GroupDecrypter) binding() binding {
	if d == nil || d.k == nil {
		return nil
	}
	return d.k
}

// Public returns the pinned public key. It makes no PKCS#11 call.
func (d *GroupDecrypter) Public() crypto.PublicKey { return publicOfKey(d.binding()) }

// KeyRef returns the key's own CKA_ID and CKA_LABEL as read from the token
// of the member whose public key was pinned.
func (d *GroupDecrypter) KeyRef() KeyRef { return refOf(d.binding()) }

// String describes the key without secrets.
func (d *GroupDecrypter) String() string { return describe(d.binding(), "GroupDecrypter") }

// Sign signs as GroupSigner.Sign does; the key must allow signing.
func (d *GroupDecrypter) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "GroupDecrypter", context.Background(), false, digest, opts)
}

// SignContext signs as GroupSigner.SignContext does.
func (d *GroupDecrypter) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signWith(d.binding(), "GroupDecrypter", ctx, true, digest, opts)
}

// SignMessage signs msg as GroupSigner.SignMessage does.
func (d *GroupDecrypter) SignMessage(_ io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "GroupDecrypter", context.Background(), false, msg, opts)
}

// SignMessageContext signs msg as GroupSigner.SignMessageContext does.
func (d *GroupDecrypter) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	return signMessageWith(d.binding(), "GroupDecrypter", ctx, true, msg, opts)
}

// Decrypt decrypts as Decrypter.Decrypt does, on a healthy member, and
// fails over as GroupSigner.Sign does. A ciphertext the key rejects
// (ErrDecryption) is never tried on another member.
func (d *GroupDecrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return decryptWith(d.binding(), "GroupDecrypter", context.Background(), false, rand, ciphertext, opts)
}

// DecryptContext is Decrypt under ctx, as GroupSigner.SignContext is Sign.
func (d *GroupDecrypter) DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return decryptWith(d.binding(), "GroupDecrypter", ctx, true, rand, ciphertext, opts)
}
