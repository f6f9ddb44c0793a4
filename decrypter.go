package hsm

import (
	"crypto"
	cryptorand "crypto/rand"
	"crypto/rsa"
	_ "crypto/sha512" // SHA-512/224 and SHA-512/256 for OAEP
	"crypto/subtle"
	"errors"
	"fmt"
	"io"

	"github.com/miekg/pkcs11"
)

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
	return &Decrypter{k}, nil
}

// decryptWith is Decrypter.Decrypt; durable keys call it on the key bound
// in the current generation. Options are checked before anything else: a
// refusal for bad options makes no PKCS#11 call.
func (k *key) decryptWith(rand io.Reader, ciphertext []byte, opts crypto.DecrypterOpts) ([]byte, error) {
	const op = "decrypt"
	if opts != nil && isNil(opts) {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "opts is %s: want nil, *rsa.PKCS1v15DecryptOptions or *rsa.OAEPOptions", nilName(opts))
	}
	switch o := opts.(type) {
	case nil:
		return k.decryptPKCS1(ciphertext, 0, rand)
	//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption, and crypto/tls's RSA key exchange uses it.
	case *rsa.PKCS1v15DecryptOptions:
		if o.SessionKeyLen < 0 || o.SessionKeyLen > k.size-11 {
			return nil, opErr(op, k.gen, ErrInvalidOptions, "SessionKeyLen %d does not fit a %d-byte modulus", o.SessionKeyLen, k.size)
		}
		return k.decryptPKCS1(ciphertext, o.SessionKeyLen, rand)
	case *rsa.OAEPOptions:
		return k.decryptOAEP(ciphertext, o)
	}
	return nil, opErr(op, k.gen, ErrInvalidOptions, "opts of type %T: want nil, *rsa.PKCS1v15DecryptOptions or *rsa.OAEPOptions", opts)
}

func (k *key) checkCiphertext(ct []byte) error {
	if len(ct) != k.size {
		return opErr("decrypt", k.gen, ErrInvalidOptions, "ciphertext is %d bytes, a %d-bit key needs exactly %d", len(ct), k.size*8, k.size)
	}
	return nil
}

// decryptPKCS1 decrypts RSAES-PKCS1-v1_5. The token does the raw RSA
// operation (CKM_RSA_X_509) and the padding is checked here in constant
// time, as crypto/rsa does, so that a ciphertext with bad padding takes the
// same PKCS#11 calls and the same code path as a good one: no error from
// the token, no session closed, no probe, no log line. With sessionKeyLen,
// the result is sessionKeyLen random bytes unless the ciphertext holds a
// key of exactly that length, chosen in constant time
// (rsa.DecryptPKCS1v15SessionKey). Only where the token refuses raw RSA for
// the key does decryption go through its CKM_RSA_PKCS, and then how a bad
// ciphertext is handled is up to the token.
func (k *key) decryptPKCS1(ct []byte, sessionKeyLen int, rand io.Reader) ([]byte, error) {
	if err := k.checkCiphertext(ct); err != nil {
		return nil, err
	}
	if rand == nil {
		rand = cryptorand.Reader
	}
	if !k.in.rawRefused.Load() {
		var sessionKey []byte
		if sessionKeyLen > 0 {
			// Read the random key whatever the ciphertext holds, as
			// crypto/rsa does, so that timing does not depend on it; before
			// the operation holds a session (rand is the caller's), and not
			// for an operation that will be refused.
			if ok, w := k.p.gate.admits(k.gen); !ok {
				k.p.health.refused.Add(1)
				return nil, k.decryptRefusals.pick(k.gen, w)
			}
			sessionKey = make([]byte, sessionKeyLen)
			if _, err := io.ReadFull(rand, sessionKey); err != nil {
				return nil, &Error{Op: "decrypt", Generation: k.gen, Err: err}
			}
		}
		em, err := k.rawRSA(ct)
		if err != errRawRefused {
			if err != nil {
				return nil, err
			}
			valid, index := unpadPKCS1(em)
			if sessionKeyLen > 0 {
				valid &= subtle.ConstantTimeEq(int32(len(em)-index), int32(sessionKeyLen))
				subtle.ConstantTimeCopy(valid, sessionKey, em[len(em)-sessionKeyLen:])
				return sessionKey, nil
			}
			if valid == 0 {
				return nil, &Error{Op: "decrypt", Generation: k.gen, Err: ErrDecryption}
			}
			return em[index:], nil
		}
	}

	// The token refuses raw RSA: its own PKCS #1 v1.5.
	out, atInit, err := k.decrypt(pkcs11.CKM_RSA_PKCS, nil, ct)
	rejected := !atInit && isRejection(err)
	if sessionKeyLen > 0 && (rejected || (err == nil && len(out) != sessionKeyLen)) {
		key := make([]byte, sessionKeyLen)
		if _, err := io.ReadFull(rand, key); err != nil {
			return nil, &Error{Op: "decrypt", Generation: k.gen, Err: err}
		}
		return key, nil
	}
	if rejected {
		return nil, k.decryptionError(err)
	}
	return out, err
}

// errRawRefused: the token refuses CKM_RSA_X_509 for this key.
var errRawRefused = errors.New("raw RSA refused")

// rawRSA returns the token's raw RSA private-key operation on ct
// (CKM_RSA_X_509), left-padded with zeros to the modulus's length. It
// returns errRawRefused when the token refuses the mechanism (remembered
// for the generation).
func (k *key) rawRSA(ct []byte) ([]byte, error) {
	if k.in.rawRefused.Load() {
		return nil, errRawRefused // learnt in this generation: no call
	}
	out, atInit, err := k.decrypt(pkcs11.CKM_RSA_X_509, nil, ct)
	if err != nil {
		if atInit && refusesParams(err) {
			if !k.in.rawRefused.Swap(true) {
				code, _ := codeOf(err)
				k.p.log.Info("hsm: the token refuses raw RSA (CKM_RSA_X_509); PKCS #1 v1.5 decryption goes through its CKM_RSA_PKCS, OAEP with parameters it refuses is not available",
					"key", k.ref.String(), "generation", k.gen, "code", CodeName(code))
			}
			return nil, errRawRefused
		}
		if !atInit && isRejection(err) {
			// Raw RSA rejects only a ciphertext not below the modulus:
			// public information, not an oracle.
			return nil, k.decryptionError(err)
		}
		return nil, err
	}
	if len(out) > k.size {
		return nil, opErr("decrypt", k.gen, fmt.Errorf("token returned %d bytes for a %d-byte modulus", len(out), k.size), "")
	}
	// A token may drop leading zeros: copy into a modulus-sized buffer,
	// the same work whatever the value.
	em := make([]byte, k.size)
	copy(em[k.size-len(out):], out)
	return em, nil
}

// unpadPKCS1 checks the RSAES-PKCS1-v1_5 encoding of em in constant time,
// as crypto/rsa does: valid is 1 when em is 0x00 0x02, at least eight
// nonzero padding bytes, 0x00, message; index is where the message starts
// (0 when not valid).
func unpadPKCS1(em []byte) (valid, index int) {
	if len(em) < 11 {
		return 0, 0
	}
	firstByteIsZero := subtle.ConstantTimeByteEq(em[0], 0)
	secondByteIsTwo := subtle.ConstantTimeByteEq(em[1], 2)
	// The first zero byte after the padding separates it from the message.
	lookingForIndex := 1
	for i := 2; i < len(em); i++ {
		equals0 := subtle.ConstantTimeByteEq(em[i], 0)
		index = subtle.ConstantTimeSelect(lookingForIndex&equals0, i, index)
		lookingForIndex = subtle.ConstantTimeSelect(equals0, 0, lookingForIndex)
	}
	// The padding must be at least eight bytes long, and it starts two
	// bytes into em.
	validPS := subtle.ConstantTimeLessOrEq(2+8, index)
	valid = firstByteIsZero & secondByteIsTwo & (^lookingForIndex & 1) & validPS
	index = subtle.ConstantTimeSelect(valid, index+1, 0)
	return valid, index
}

func (k *key) decryptOAEP(ct []byte, o *rsa.OAEPOptions) ([]byte, error) {
	const op = "decrypt"
	m, tokenHash := hashMechs[o.Hash]
	if !tokenHash && !softOAEPHashes[o.Hash] {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP hash %v is not supported (SHA-1, SHA-224, SHA-256, SHA-384, SHA-512 are, and SHA-512/224 and SHA-512/256 where the token does raw RSA)", o.Hash)
	}
	mgfHash := o.MGFHash
	if mgfHash == 0 {
		mgfHash = o.Hash
	}
	mm, tokenMGF := hashMechs[mgfHash]
	if !tokenMGF && !softOAEPHashes[mgfHash] {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP MGF1 hash %v is not supported", mgfHash)
	}
	if 2*o.Hash.Size()+2 > k.size {
		return nil, opErr(op, k.gen, ErrInvalidOptions, "a %d-bit key is too small for OAEP with %v", k.size*8, o.Hash)
	}
	if err := k.checkCiphertext(ct); err != nil {
		return nil, err
	}
	if !tokenHash || !tokenMGF {
		// PKCS#11 has no OAEP parameters for these hashes: decoded here,
		// over the token's raw RSA, or not at all.
		em, err := k.rawRSA(ct)
		switch {
		case err == errRawRefused:
			return nil, opErr(op, k.gen, ErrInvalidOptions, "OAEP with %v/MGF1-%v is decoded in software over raw RSA (PKCS#11 has no OAEP parameters for it), and the token refuses raw RSA (CKM_RSA_X_509) for this key", o.Hash, mgfHash)
		case err != nil:
			return nil, err
		}
		return k.unpadOAEP(em, o, mgfHash)
	}
	// With a label, OAEP is decoded here over raw RSA whenever the token
	// allows it: tokens are not all trusted to check a label (SoftHSM 2.6's
	// CKM_RSA_PKCS_OAEP with SHA-1 ignores it, and decrypts a ciphertext
	// made without one under any label; tpm2-pkcs11 wants it to end in a
	// NUL byte).
	labelled := len(o.Label) > 0
	shape := oaepShape{o.Hash, mgfHash, labelled}
	_, soft := k.in.oaepSoft.Load(shape)
	if labelled || soft {
		em, err := k.rawRSA(ct)
		switch {
		case err == nil:
			return k.unpadOAEP(em, o, mgfHash)
		case err != errRawRefused:
			return nil, err
		case soft:
			return nil, k.neitherOAEP(o.Hash, mgfHash, labelled)
		}
		// Raw RSA refused: the token's own OAEP, trusted with the label.
	}
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
		"hash", o.Hash.String(), "mgf", mgfHash.String(), "label", labelled, "err", err)
	em, err := k.rawRSA(ct)
	if err == errRawRefused {
		return nil, k.neitherOAEP(o.Hash, mgfHash, labelled)
	}
	if err != nil {
		return nil, err
	}
	return k.unpadOAEP(em, o, mgfHash)
}

// softOAEPHashes are the hashes OAEP takes only in software: PKCS#11 has
// no CKM_ digest or CKG_MGF1_ function for them (crypto/rsa takes them).
var softOAEPHashes = map[crypto.Hash]bool{crypto.SHA512_224: true, crypto.SHA512_256: true}

// neitherOAEP is the error for a token that has no way to decrypt OAEP
// with these parameters.
func (k *key) neitherOAEP(hash, mgfHash crypto.Hash, labelled bool) error {
	label := ""
	if labelled {
		label = " and a label"
	}
	return opErr("decrypt", k.gen, ErrInvalidOptions, "the token supports neither CKM_RSA_PKCS_OAEP with %v/MGF1-%v%s nor raw RSA (CKM_RSA_X_509)", hash, mgfHash, label)
}

// unpadOAEP decodes em, the raw RSA decryption of an OAEP ciphertext, in
// constant time.
func (k *key) unpadOAEP(em []byte, o *rsa.OAEPOptions, mgfHash crypto.Hash) ([]byte, error) {
	msg, ok := unpadOAEP(em, o.Hash, mgfHash, o.Label)
	if !ok {
		return nil, &Error{Op: "decrypt", Generation: k.gen, Err: ErrDecryption}
	}
	return msg, nil
}

// decrypt runs C_DecryptInit and C_Decrypt with mech on a session: two
// PKCS#11 calls into a buffer of the modulus's size where the module's
// function list could be validated (fastsign.go), else miekg/pkcs11's
// three. oaep holds the parameters of CKM_RSA_PKCS_OAEP. atInit says
// whether a failure came before C_Decrypt (no ciphertext was looked at). A
// rejection by C_Decrypt closes the session and starts no probe.
func (k *key) decrypt(mech uint, oaep *pkcs11.OAEPParams, ct []byte) (out []byte, atInit bool, err error) {
	atInit = true
	err = k.p.run(k.gen, k.decryptRefusals, k.p.cfg.SessionWaitTimeout, runOp, func(in *instance, s pkcs11.SessionHandle) error {
		err := k.decryptOn(in, s, mech, oaep, ct, &out, &atInit)
		if err != nil && !atInit && isRejection(err) {
			return rejectedData(unmark(err))
		}
		return err
	})
	return out, atInit, err
}

func (k *key) decryptOn(in *instance, s pkcs11.SessionHandle, mech uint, oaep *pkcs11.OAEPParams, ct []byte, out *[]byte, atInit *bool) error {
	if fl := k.p.fast; fl != nil && !k.alwaysAuth {
		var err error
		*out, *atInit, err = fastDecrypt(fl, s, mech, oaep, k.handle, ct, k.size)
		return err
	}
	m := pkcs11.NewMechanism(mech, nil)
	if oaep != nil {
		m = pkcs11.NewMechanism(mech, oaep)
	}
	if err := in.ctx.DecryptInit(s, []*pkcs11.Mechanism{m}, k.handle); err != nil {
		return err
	}
	if err := k.contextLogin(in, s); err != nil {
		return err
	}
	*atInit = false
	var err error
	if *out, err = in.ctx.Decrypt(s, ct); err != nil {
		return mayBeActive(err)
	}
	return nil
}

// decryptionError is ErrDecryption for a ciphertext the token rejected,
// with the token's code kept visible (Error.Code, errors.As pkcs11.Error):
// some modules report real failures with the codes of a rejection
// (tpm2-pkcs11 answers CKR_GENERAL_ERROR to an OAEP label without a
// trailing NUL byte).
func (k *key) decryptionError(err error) error {
	code, _ := codeOf(err)
	return &Error{Op: "decrypt", Code: code, Generation: k.gen, Err: causedBy(ErrDecryption, pkcs11.Error(code))}
}

// isRejection reports whether a failure of C_Decrypt (not of C_DecryptInit)
// means the token refused the ciphertext. SoftHSM reports bad padding as
// CKR_GENERAL_ERROR.
func isRejection(err error) bool {
	code, ok := codeOf(err)
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
	code, ok := codeOf(err)
	if !ok {
		return false
	}
	switch code {
	case pkcs11.CKR_ARGUMENTS_BAD, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_MECHANISM_INVALID:
		return true
	}
	return false
}
