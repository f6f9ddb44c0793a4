package stepkms

import (
	"context"
	"crypto"
	"io"

	"github.com/ce46d8f2/hsm"
)

// Compile-time checks: the keys of a KMS are hsm's context keys.
var (
	_ hsm.ContextSigner    = (*signer)(nil)
	_ hsm.ContextDecrypter = (*decrypter)(nil)
	_ crypto.MessageSigner = (*signer)(nil)
	_ crypto.MessageSigner = (*decrypter)(nil)
)

// signer is a durable signer of a KMS: hsm's, failing with hsm.ErrClosed
// once its KMS is closed, even while other KMSes keep the shared provider
// open. It holds its KMS, so that the KMS stays reachable (see dropped)
// while the signer is. Safe for concurrent use.
type signer struct {
	k *KMS
	d *hsm.DurableSigner
}

// Public returns the public key; no PKCS#11 call.
func (s *signer) Public() crypto.PublicKey { return s.d.Public() }

// Sign is hsm.DurableSigner's Sign, or an error matching hsm.ErrClosed
// after the KMS's Close. A signature already under way when Close is
// called completes.
func (s *signer) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := s.k.open("sign"); err != nil {
		return nil, err
	}
	return s.d.Sign(rand, digest, opts)
}

// SignContext is hsm.DurableSigner's SignContext (it waits for a lost HSM
// until ctx ends), or an error matching hsm.ErrClosed after the KMS's
// Close.
func (s *signer) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := s.k.open("sign"); err != nil {
		return nil, err
	}
	return s.d.SignContext(ctx, digest, opts)
}

// SignMessage is hsm.DurableSigner's SignMessage (crypto.MessageSigner: a
// key restricted to the token's hash-and-sign mechanisms signs with them),
// or an error matching hsm.ErrClosed after the KMS's Close.
func (s *signer) SignMessage(rand io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := s.k.open("sign"); err != nil {
		return nil, err
	}
	return s.d.SignMessage(rand, msg, opts)
}

// SignMessageContext is hsm.DurableSigner's SignMessageContext, or an
// error matching hsm.ErrClosed after the KMS's Close.
func (s *signer) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := s.k.open("sign"); err != nil {
		return nil, err
	}
	return s.d.SignMessageContext(ctx, msg, opts)
}

// KeyRef returns the key's CKA_ID and CKA_LABEL as read from the token.
func (s *signer) KeyRef() hsm.KeyRef { return s.d.KeyRef() }

// Generation returns the generation of the provider the key is bound in.
func (s *signer) Generation() uint64 { return s.d.Generation() }

// String describes the key, without secrets.
func (s *signer) String() string { return "stepkms " + s.d.String() }

// decrypter is signer's counterpart for hsm.DurableDecrypter.
type decrypter struct {
	k *KMS
	d *hsm.DurableDecrypter
}

// Public returns the public key; no PKCS#11 call.
func (d *decrypter) Public() crypto.PublicKey { return d.d.Public() }

// Sign is hsm.DurableDecrypter's Sign, or an error matching hsm.ErrClosed
// after the KMS's Close.
func (d *decrypter) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := d.k.open("sign"); err != nil {
		return nil, err
	}
	return d.d.Sign(rand, digest, opts)
}

// SignContext is hsm.DurableDecrypter's SignContext, or an error matching
// hsm.ErrClosed after the KMS's Close.
func (d *decrypter) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := d.k.open("sign"); err != nil {
		return nil, err
	}
	return d.d.SignContext(ctx, digest, opts)
}

// SignMessage is hsm.DurableDecrypter's SignMessage, or an error matching
// hsm.ErrClosed after the KMS's Close.
func (d *decrypter) SignMessage(rand io.Reader, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := d.k.open("sign"); err != nil {
		return nil, err
	}
	return d.d.SignMessage(rand, msg, opts)
}

// SignMessageContext is hsm.DurableDecrypter's SignMessageContext, or an
// error matching hsm.ErrClosed after the KMS's Close.
func (d *decrypter) SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error) {
	if err := d.k.open("sign"); err != nil {
		return nil, err
	}
	return d.d.SignMessageContext(ctx, msg, opts)
}

// Decrypt is hsm.DurableDecrypter's Decrypt, or an error matching
// hsm.ErrClosed after the KMS's Close.
func (d *decrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if err := d.k.open("decrypt"); err != nil {
		return nil, err
	}
	return d.d.Decrypt(rand, ciphertext, opts)
}

// DecryptContext is hsm.DurableDecrypter's DecryptContext, or an error
// matching hsm.ErrClosed after the KMS's Close.
func (d *decrypter) DecryptContext(ctx context.Context, rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	if err := d.k.open("decrypt"); err != nil {
		return nil, err
	}
	return d.d.DecryptContext(ctx, rand, ciphertext, opts)
}

// KeyRef returns the key's CKA_ID and CKA_LABEL as read from the token.
func (d *decrypter) KeyRef() hsm.KeyRef { return d.d.KeyRef() }

// Generation returns the generation of the provider the key is bound in.
func (d *decrypter) Generation() uint64 { return d.d.Generation() }

// String describes the key, without secrets.
func (d *decrypter) String() string { return "stepkms " + d.d.String() }
