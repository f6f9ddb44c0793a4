package hsm

import (
	"crypto"
	cryptorand "crypto/rand"
	"crypto/rsa"
	"fmt"
	"io"

	"github.com/miekg/pkcs11"
)

// Decrypter is an RSA private key on the token that implements
// crypto.Decrypter with the semantics of crypto/rsa, and crypto.Signer (it is
// a Signer too). Like Signer it belongs to one generation of the PKCS#11
// library. Safe for concurrent use.
type Decrypter struct{ Signer }

// Decrypter looks up the RSA private key ref in the current generation, as
// Signer does, and requires that it allows decryption (CKA_DECRYPT). An EC or
// Ed25519 key is refused with ErrUnsupportedKey.
func (p *Provider) Decrypter(ref KeyRef) (*Decrypter, error) {
	k, err := p.lookup(ref)
	if err != nil {
		return nil, err
	}
	if k.kind != kindRSA {
		return nil, opErr("find key", k.gen, ErrUnsupportedKey, "%s is an %v key; only RSA keys decrypt", k.ref, k.kind)
	}
	if !k.canDecrypt {
		return nil, opErr("find key", k.gen, ErrUnsupportedKey, "%s does not allow decryption (CKA_DECRYPT is false)", k.ref)
	}
	return &Decrypter{Signer{k}}, nil
}

// String describes the key without secrets.
func (d *Decrypter) String() string {
	return fmt.Sprintf("hsm.Decrypter{%s, %s, generation %d}", d.k.describe(), d.k.ref, d.k.gen)
}

// Decrypt decrypts ciphertext exactly as rsa.PrivateKey.Decrypt defines:
//   - opts nil or *rsa.PKCS1v15DecryptOptions: RSAES-PKCS1-v1_5. With
//     SessionKeyLen > 0, a ciphertext that does not decrypt to a key of that
//     length yields SessionKeyLen random bytes (read from rand, or
//     crypto/rand when rand is nil) and no error, as
//     rsa.DecryptPKCS1v15SessionKey does, so that the caller does not
//     become a padding oracle. How long the token takes to reject a
//     ciphertext is up to the token.
//   - *rsa.OAEPOptions: RSAES-OAEP with Hash, MGFHash (zero means Hash) and
//     Label; SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512.
//
// The ciphertext must be exactly as long as the modulus. A ciphertext the
// token rejects gives an error matching ErrDecryption. Refusals
// (ErrInvalidOptions, ErrStaleKey, ErrUnavailable, ErrClosed) make no
// PKCS#11 call. Blocks like Sign.
func (d *Decrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	const op = "decrypt"
	k := d.k
	if ok, w := k.p.gate.enter(k.gen); !ok {
		return nil, k.decryptErrs.pick(k.gen, w)
	}
	defer k.p.gate.exit()

	var mech *pkcs11.Mechanism
	sessionKeyLen := 0
	switch o := opts.(type) {
	case nil:
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)
	case *rsa.PKCS1v15DecryptOptions:
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)
		sessionKeyLen = o.SessionKeyLen
		if sessionKeyLen < 0 || sessionKeyLen > k.size-11 {
			return nil, opErr(op, k.gen, ErrInvalidOptions, "SessionKeyLen %d does not fit a %d-byte modulus", sessionKeyLen, k.size)
		}
	case *rsa.OAEPOptions:
		m, ok := hashMechs[o.Hash]
		if !ok {
			return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP hash %v is not supported (SHA-1, SHA-224, SHA-256, SHA-384, SHA-512 are)", o.Hash)
		}
		mgf := m[1]
		if o.MGFHash != 0 {
			mm, ok := hashMechs[o.MGFHash]
			if !ok {
				return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP MGF1 hash %v is not supported", o.MGFHash)
			}
			mgf = mm[1]
		}
		if 2*o.Hash.Size()+2 > k.size {
			return nil, opErr(op, k.gen, ErrInvalidOptions, "a %d-bit key is too small for OAEP with %v", k.size*8, o.Hash)
		}
		params := pkcs11.NewOAEPParams(m[0], mgf, pkcs11.CKZ_DATA_SPECIFIED, o.Label)
		mech = pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, params)
	default:
		return nil, opErr(op, k.gen, ErrInvalidOptions, "opts of type %T: want nil, *rsa.PKCS1v15DecryptOptions or *rsa.OAEPOptions", opts)
	}
	if len(ciphertext) != k.size {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "ciphertext is %d bytes, a %d-bit key needs exactly %d", len(ciphertext), k.size*8, k.size)
	}

	out, err := k.call(op, func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) ([]byte, error) {
		if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{mech}, k.handle); err != nil {
			return nil, err
		}
		return ctx.Decrypt(s, ciphertext)
	})
	rejected := isRejection(err)
	if sessionKeyLen > 0 && (rejected || (err == nil && len(out) != sessionKeyLen)) {
		if rand == nil {
			rand = cryptorand.Reader
		}
		key := make([]byte, sessionKeyLen)
		if _, err := io.ReadFull(rand, key); err != nil {
			return nil, opErr(op, k.gen, err, "")
		}
		return key, nil
	}
	if rejected {
		code, _ := CodeOf(err)
		return nil, &Error{Op: op, Code: code, Generation: k.gen, Err: fmt.Errorf("%w (%w)", ErrDecryption, pkcs11.Error(code))}
	}
	return out, err
}

// isRejection reports whether the token refused the ciphertext itself.
func isRejection(err error) bool {
	code, ok := CodeOf(err)
	if !ok {
		return false
	}
	switch code {
	case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE, pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE:
		return true
	}
	return false
}
