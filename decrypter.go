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
//     Label; SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512. When the token's
//     CKM_RSA_PKCS_OAEP refuses these parameters (SoftHSM 2.6 takes only
//     SHA-1 without a label), the token does the raw RSA operation
//     (CKM_RSA_X_509) and the OAEP padding is checked here in constant time.
//     The choice is remembered for the generation.
//
// The ciphertext must be exactly as long as the modulus. A ciphertext the
// token or the padding check rejects gives an error matching ErrDecryption.
// Refusals (ErrInvalidOptions, ErrStaleKey, ErrUnavailable, ErrClosed) make
// no PKCS#11 call. Blocks like Sign. Safe for concurrent use.
func (d *Decrypter) Decrypt(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	return d.k.decryptWith(rand, ciphertext, opts)
}

// decryptWith is Decrypter.Decrypt; durable keys call it on the key bound
// in the current generation.
func (k *key) decryptWith(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	const op = "decrypt"
	if ok, w := k.p.gate.enter(k.gen); !ok {
		k.p.health.refused.Add(1)
		return nil, k.decryptErrs.pick(k.gen, w)
	}
	defer k.p.gate.exit()
	k.p.health.ops.Add(1)

	var (
		out []byte
		err error
	)
	switch o := opts.(type) {
	case nil:
		out, err = k.decryptPKCS1(ciphertext, 0, rand)
	//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption, and crypto/tls's RSA key exchange uses it.
	case *rsa.PKCS1v15DecryptOptions:
		if o.SessionKeyLen < 0 || o.SessionKeyLen > k.size-11 {
			return nil, opErr(op, k.gen, ErrInvalidOptions, "SessionKeyLen %d does not fit a %d-byte modulus", o.SessionKeyLen, k.size)
		}
		out, err = k.decryptPKCS1(ciphertext, o.SessionKeyLen, rand)
	case *rsa.OAEPOptions:
		out, err = k.decryptOAEP(ciphertext, o)
	default:
		return nil, opErr(op, k.gen, ErrInvalidOptions, "opts of type %T: want nil, *rsa.PKCS1v15DecryptOptions or *rsa.OAEPOptions", opts)
	}
	return out, err
}

func (k *key) checkCiphertext(ct []byte) error {
	if len(ct) != k.size {
		return opErr("decrypt", k.gen, ErrInvalidOptions, "ciphertext is %d bytes, a %d-bit key needs exactly %d", len(ct), k.size*8, k.size)
	}
	return nil
}

func (k *key) decryptPKCS1(ct []byte, sessionKeyLen int, rand io.Reader) ([]byte, error) {
	if err := k.checkCiphertext(ct); err != nil {
		return nil, err
	}
	out, atInit, err := k.decrypt(pkcs11.CKM_RSA_PKCS, nil, ct)
	rejected := !atInit && isRejection(err)
	if sessionKeyLen > 0 && (rejected || (err == nil && len(out) != sessionKeyLen)) {
		if rand == nil {
			rand = cryptorand.Reader
		}
		key := make([]byte, sessionKeyLen)
		if _, err := io.ReadFull(rand, key); err != nil {
			return nil, opErr("decrypt", k.gen, err, "")
		}
		return key, nil
	}
	if rejected {
		return nil, k.decryptionError(err)
	}
	return out, err
}

func (k *key) decryptOAEP(ct []byte, o *rsa.OAEPOptions) ([]byte, error) {
	const op = "decrypt"
	m, ok := hashMechs[o.Hash]
	if !ok {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP hash %v is not supported (SHA-1, SHA-224, SHA-256, SHA-384, SHA-512 are)", o.Hash)
	}
	mgfHash := o.MGFHash
	if mgfHash == 0 {
		mgfHash = o.Hash
	}
	mm, ok := hashMechs[mgfHash]
	if !ok {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP MGF1 hash %v is not supported", mgfHash)
	}
	if 2*o.Hash.Size()+2 > k.size {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "a %d-bit key is too small for OAEP with %v", k.size*8, o.Hash)
	}
	if err := k.checkCiphertext(ct); err != nil {
		return nil, err
	}
	shape := oaepShape{o.Hash, mgfHash, len(o.Label) > 0}
	if _, soft := k.in.oaepSoft.Load(shape); !soft {
		params := pkcs11.NewOAEPParams(m[0], mm[1], pkcs11.CKZ_DATA_SPECIFIED, o.Label)
		out, atInit, err := k.decrypt(pkcs11.CKM_RSA_PKCS_OAEP, params, ct)
		if !atInit || !refusesParams(err) {
			if !atInit && isRejection(err) {
				return nil, k.decryptionError(err)
			}
			return out, err
		}
		k.in.oaepSoft.Store(shape, true)
		k.p.log.Info("hsm: the token's CKM_RSA_PKCS_OAEP refuses these parameters; decoding OAEP in software over CKM_RSA_X_509",
			"hash", o.Hash.String(), "mgf", mgfHash.String(), "label", len(o.Label) > 0, "err", err)
	}
	em, atInit, err := k.decrypt(pkcs11.CKM_RSA_X_509, nil, ct)
	if err != nil {
		if atInit && refusesParams(err) {
			code, _ := CodeOf(err)
			return nil, opErr(op, k.gen, ErrInvalidOptions, "the token supports neither CKM_RSA_PKCS_OAEP with %v/MGF1-%v%s nor raw RSA (CKM_RSA_X_509): %s",
				o.Hash, mgfHash, map[bool]string{true: " and a label"}[len(o.Label) > 0], CodeName(code))
		}
		if !atInit && isRejection(err) {
			return nil, k.decryptionError(err)
		}
		return nil, err
	}
	if len(em) > k.size {
		return nil, opErr(op, k.gen, fmt.Errorf("token returned %d bytes for a %d-byte modulus", len(em), k.size), "")
	}
	if len(em) < k.size { // a token may drop leading zeros
		em = append(make([]byte, k.size-len(em)), em...)
	}
	msg, ok := unpadOAEP(em, o.Hash, mgfHash, o.Label)
	if !ok {
		return nil, &Error{Op: op, Generation: k.gen, Err: ErrDecryption}
	}
	return msg, nil
}

// decrypt runs C_DecryptInit and C_Decrypt on a session: two PKCS#11
// calls into a buffer of the modulus's size where the module's function list
// could be validated (fastsign.go), else miekg/pkcs11's three. oaep holds
// the parameters of CKM_RSA_PKCS_OAEP. atInit says whether a failure came
// before C_Decrypt (no ciphertext was looked at).
func (k *key) decrypt(mech uint, oaep *pkcs11.OAEPParams, ct []byte) (out []byte, atInit bool, err error) {
	atInit = true
	out, err = k.call("decrypt", func(ctx *pkcs11.Ctx, s pkcs11.SessionHandle) ([]byte, error) {
		if fl := k.p.fast; fl != nil {
			var err error
			out, atInit, err = fastDecrypt(fl, s, mech, oaep, k.handle, ct, k.size)
			return out, err
		}
		m := pkcs11.NewMechanism(mech, nil)
		if oaep != nil {
			m = pkcs11.NewMechanism(mech, oaep)
		}
		if err := ctx.DecryptInit(s, []*pkcs11.Mechanism{m}, k.handle); err != nil {
			return nil, err
		}
		atInit = false
		return ctx.Decrypt(s, ct)
	})
	return out, atInit, err
}

func (k *key) decryptionError(err error) error {
	code, _ := CodeOf(err)
	return &Error{Op: "decrypt", Code: code, Generation: k.gen, Err: fmt.Errorf("%w (%w)", ErrDecryption, pkcs11.Error(code))}
}

// isRejection reports whether a failure of C_Decrypt (not of C_DecryptInit)
// means the token refused the ciphertext. SoftHSM reports bad padding as
// CKR_GENERAL_ERROR.
func isRejection(err error) bool {
	code, ok := CodeOf(err)
	if !ok {
		return false
	}
	switch code {
	case pkcs11.CKR_ENCRYPTED_DATA_INVALID, pkcs11.CKR_ENCRYPTED_DATA_LEN_RANGE,
		pkcs11.CKR_DATA_INVALID, pkcs11.CKR_DATA_LEN_RANGE, pkcs11.CKR_GENERAL_ERROR:
		return true
	}
	return false
}

// refusesParams reports whether a C_DecryptInit failure means the token does
// not support the mechanism or its parameters.
func refusesParams(err error) bool {
	code, ok := CodeOf(err)
	if !ok {
		return false
	}
	switch code {
	case pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_MECHANISM_INVALID:
		return true
	}
	return false
}
