package hsm

import (
	"crypto"
	"crypto/rsa"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/miekg/pkcs11"
)

// Message signing (crypto.MessageSigner), and keys restricted to the
// token's hash-and-sign mechanisms.
//
// Sign gets a digest, and the token signs it with a raw mechanism
// (CKM_RSA_PKCS over a DigestInfo, CKM_RSA_PKCS_PSS, CKM_ECDSA). Many HSM
// policies limit a key, through CKA_ALLOWED_MECHANISMS, to mechanisms that
// hash on the token too (CKM_SHA256_RSA_PKCS_PSS and the like): such a key
// cannot sign a digest at all (SoftHSM 2.6 answers CKR_MECHANISM_INVALID).
// SignMessage gets the whole message, so it can use either. The rule:
//
//  1. Ed25519 signs the message, as Sign does (CKM_EDDSA is not a
//     hash-and-sign mechanism of this kind).
//  2. When the key may use the raw mechanism, the message is hashed here
//     and signed exactly as Sign signs its digest: the two-call path, and
//     only a digest on the wire.
//  3. Otherwise the token's combined mechanism for the hash signs the whole
//     message (CKM_SHA{1,224,256,384,512}_RSA_PKCS, the same with _PSS and
//     its parameters, CKM_ECDSA_SHA{1,224,256,384,512}), also in two calls.
//     Its signature is the one rule 2 would make: it verifies the same.
//
// How a key is known not to allow the raw mechanism, both ways:
//
//   - At lookup, from CKA_ALLOWED_MECHANISMS, read in the lookup's one
//     C_GetAttributeValue with the other attributes (lookupAttrs): a key
//     whose list does not name the raw mechanism never tries it, so a
//     restricted key costs no failed call, and a bad request is refused
//     without any. Absent or empty means unrestricted, as the standard
//     says.
//   - From a refusal: C_SignInit with the raw mechanism failing with
//     CKR_MECHANISM_INVALID or CKR_KEY_FUNCTION_NOT_PERMITTED, remembered
//     for the key in its generation (a durable key's next binding starts
//     afresh, as the token may have changed). This covers a module that
//     does not have the attribute (lookups that read only what each object
//     has stop asking for it, strictValues), one that lacks the raw
//     mechanism and offers only the combined one, and policies not written
//     in the attribute. The refused call costs one C_SignInit, once.
//
// Either way Sign of a digest then fails at once with ErrUnsupportedKey
// saying to sign the message with SignMessage, as crypto/tls and
// crypto/x509 do (through crypto.SignMessage).

// scheme is what a signature is, whatever mechanism makes it.
type scheme uint8

const (
	schemePKCS1 scheme = iota // RSASSA-PKCS1-v1_5
	schemePSS                 // RSASSA-PSS
	schemeECDSA
	schemeEdDSA
	numSchemes
)

func (s scheme) String() string {
	return [...]string{"RSA PKCS #1 v1.5", "RSA-PSS", "ECDSA", "Ed25519"}[s]
}

// rawMechs are the mechanisms Sign signs a digest with, by scheme.
var rawMechs = [numSchemes]uint{pkcs11.CKM_RSA_PKCS, pkcs11.CKM_RSA_PKCS_PSS, pkcs11.CKM_ECDSA, ckmEdDSA}

// combinedMechs are the hash-and-sign mechanisms of PKCS#11 2.40, by
// scheme and hash.
var combinedMechs = [numSchemes]map[crypto.Hash]uint{
	schemePKCS1: {
		crypto.SHA1: pkcs11.CKM_SHA1_RSA_PKCS, crypto.SHA224: pkcs11.CKM_SHA224_RSA_PKCS, crypto.SHA256: pkcs11.CKM_SHA256_RSA_PKCS,
		crypto.SHA384: pkcs11.CKM_SHA384_RSA_PKCS, crypto.SHA512: pkcs11.CKM_SHA512_RSA_PKCS,
	},
	schemePSS: {
		crypto.SHA1: pkcs11.CKM_SHA1_RSA_PKCS_PSS, crypto.SHA224: pkcs11.CKM_SHA224_RSA_PKCS_PSS, crypto.SHA256: pkcs11.CKM_SHA256_RSA_PKCS_PSS,
		crypto.SHA384: pkcs11.CKM_SHA384_RSA_PKCS_PSS, crypto.SHA512: pkcs11.CKM_SHA512_RSA_PKCS_PSS,
	},
	schemeECDSA: {
		crypto.SHA1: pkcs11.CKM_ECDSA_SHA1, crypto.SHA224: pkcs11.CKM_ECDSA_SHA224, crypto.SHA256: pkcs11.CKM_ECDSA_SHA256,
		crypto.SHA384: pkcs11.CKM_ECDSA_SHA384, crypto.SHA512: pkcs11.CKM_ECDSA_SHA512,
	},
}

// mechNames names the signing mechanisms in messages.
var mechNames = map[uint]string{
	pkcs11.CKM_RSA_PKCS: "CKM_RSA_PKCS", pkcs11.CKM_RSA_PKCS_PSS: "CKM_RSA_PKCS_PSS", pkcs11.CKM_ECDSA: "CKM_ECDSA", ckmEdDSA: "CKM_EDDSA",
	pkcs11.CKM_RSA_X_509: "CKM_RSA_X_509", pkcs11.CKM_RSA_PKCS_OAEP: "CKM_RSA_PKCS_OAEP", pkcs11.CKM_ECDH1_DERIVE: "CKM_ECDH1_DERIVE",
	pkcs11.CKM_SHA1_RSA_PKCS: "CKM_SHA1_RSA_PKCS", pkcs11.CKM_SHA224_RSA_PKCS: "CKM_SHA224_RSA_PKCS", pkcs11.CKM_SHA256_RSA_PKCS: "CKM_SHA256_RSA_PKCS",
	pkcs11.CKM_SHA384_RSA_PKCS: "CKM_SHA384_RSA_PKCS", pkcs11.CKM_SHA512_RSA_PKCS: "CKM_SHA512_RSA_PKCS",
	pkcs11.CKM_SHA1_RSA_PKCS_PSS: "CKM_SHA1_RSA_PKCS_PSS", pkcs11.CKM_SHA224_RSA_PKCS_PSS: "CKM_SHA224_RSA_PKCS_PSS", pkcs11.CKM_SHA256_RSA_PKCS_PSS: "CKM_SHA256_RSA_PKCS_PSS",
	pkcs11.CKM_SHA384_RSA_PKCS_PSS: "CKM_SHA384_RSA_PKCS_PSS", pkcs11.CKM_SHA512_RSA_PKCS_PSS: "CKM_SHA512_RSA_PKCS_PSS",
	pkcs11.CKM_ECDSA_SHA1: "CKM_ECDSA_SHA1", pkcs11.CKM_ECDSA_SHA224: "CKM_ECDSA_SHA224", pkcs11.CKM_ECDSA_SHA256: "CKM_ECDSA_SHA256",
	pkcs11.CKM_ECDSA_SHA384: "CKM_ECDSA_SHA384", pkcs11.CKM_ECDSA_SHA512: "CKM_ECDSA_SHA512",
}

// mechName names mechanism m: "CKM_SHA256_RSA_PKCS_PSS", or "0x43" for
// one mechNames does not know.
func mechName(m uint) string {
	if n, ok := mechNames[m]; ok {
		return n
	}
	return fmt.Sprintf("0x%x", m)
}

func mechList(ms []uint) string {
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = mechName(m)
	}
	return strings.Join(names, ", ")
}

// ulongSize is the size of a CK_ULONG of the platform's modules.
var ulongSize = len(pkcs11.NewAttribute(0, uint(0)).Value)

// ulongs encodes ms as a CK_MECHANISM_TYPE array attribute value:
// native-endian CK_ULONGs, as the module reads them.
func ulongs(ms []uint) []byte {
	out := make([]byte, 0, len(ms)*ulongSize)
	for _, m := range ms {
		out = append(out, pkcs11.NewAttribute(0, m).Value...)
	}
	return out
}

// parseMechanisms decodes a CK_MECHANISM_TYPE array attribute value;
// nil for an absent or empty one, or one that is not a whole number of
// CK_ULONGs (then nothing is known of the key's restrictions).
func parseMechanisms(v []byte) []uint {
	if len(v) == 0 || len(v)%ulongSize != 0 {
		return nil
	}
	ms := make([]uint, len(v)/ulongSize)
	for i := range ms {
		ms[i] = ulong(v[i*ulongSize : (i+1)*ulongSize])
	}
	return ms
}

// signMechs is what is known of the signing mechanisms a key may use. A
// key's copies (asCheck) share it. A nil *signMechs knows of no
// restriction.
type signMechs struct {
	// allowed is the key's CKA_ALLOWED_MECHANISMS as read at lookup; nil
	// when it has none, or the lookup did not read it. Read only.
	allowed []uint
	// blocked has bit 1<<s set for each scheme s whose raw mechanism
	// allowed leaves out. Read only.
	blocked uint32
	// refused has bit 1<<s set for each scheme s whose raw mechanism the
	// token refused for the key (learn).
	refused atomic.Uint32
}

func newSignMechs(allowed []uint) *signMechs {
	m := &signMechs{allowed: allowed}
	if allowed != nil {
		for s := range numSchemes {
			if !m.allows(rawMechs[s]) {
				m.blocked |= 1 << s
			}
		}
	}
	return m
}

// allows reports whether the key's CKA_ALLOWED_MECHANISMS lets it use
// mech (true when it has none).
func (m *signMechs) allows(mech uint) bool {
	if m == nil || m.allowed == nil {
		return true
	}
	for _, a := range m.allowed {
		if a == mech {
			return true
		}
	}
	return false
}

// rawAllowed reports whether the key may sign a digest with the raw
// mechanism of s, as far as is known: the hot path's check, one atomic
// load.
func (m *signMechs) rawAllowed(s scheme) bool {
	return m == nil || (m.blocked|m.refused.Load())&(1<<s) == 0
}

// learn records that the token refused the raw mechanism of s for k, when
// err, a failure of C_SignInit with it, says so, and reports whether it
// did. Ed25519 has no other mechanism: nothing is learnt.
func (k *key) learn(s scheme, atInit bool, err error) (uint, bool) {
	code, ok := codeOf(err)
	if !atInit || !ok || !refusesMech(code) || s == schemeEdDSA || k.mechs == nil {
		return 0, false
	}
	if k.mechs.refused.Or(1<<s)&(1<<s) == 0 {
		k.p.log.Info("hsm: the token refuses a raw signing mechanism for the key; SignMessage uses its hash-and-sign mechanisms, and Sign of a digest is refused",
			"key", k.ref.String(), "generation", k.gen, "mechanism", mechName(rawMechs[s]), "code", CodeName(code))
	}
	return code, true
}

// refusesMech reports whether a C_SignInit failure says the key may not
// use the mechanism (rather than that its parameters are wrong).
func refusesMech(code uint) bool {
	return code == pkcs11.CKR_MECHANISM_INVALID || code == pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED
}

// whyNotRaw says why k does not sign with the raw mechanism of s.
func (k *key) whyNotRaw(s scheme) string {
	if k.mechs.blocked&(1<<s) != 0 {
		return fmt.Sprintf("the key may be used only with %s (CKA_ALLOWED_MECHANISMS)", mechList(k.mechs.allowed))
	}
	return fmt.Sprintf("the token refused %s for the key", mechName(rawMechs[s]))
}

// digestRefused is Sign's error for a key that may not sign a digest with
// the raw mechanism of s; code is the token's refusal, 0 when the key's
// CKA_ALLOWED_MECHANISMS said so without a call.
func (k *key) digestRefused(s scheme, code uint) error {
	hint := ""
	for _, m := range combinedMechs[s] {
		if k.mechs.allows(m) {
			hint = "; sign the message instead, with SignMessage (or crypto.SignMessage, as crypto/tls and crypto/x509 do), which uses the token's hash-and-sign mechanism"
			break
		}
	}
	err := wrapf(ErrUnsupportedKey, "%s cannot sign a digest with %s: %s%s", k.ref, mechName(rawMechs[s]), k.whyNotRaw(s), hint)
	if code == 0 {
		return &Error{Op: "sign", Generation: k.gen, Err: err}
	}
	return &Error{Op: "sign", Code: code, Generation: k.gen, Err: causedBy(err, pkcs11.Error(code))}
}

// signMessage is SignMessage of every kind: msg signed whole, as the rule
// above says. Bad input is refused without a PKCS#11 call.
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
	s, h, err := k.messageScheme(opts)
	if err != nil {
		return nil, &Error{Op: op, Generation: k.gen, Err: err}
	}
	mech, err := k.messageMech(s, h)
	if err != nil {
		return nil, &Error{Op: op, Generation: k.gen, Err: err}
	}
	if mech == 0 {
		if !h.Available() {
			return nil, &Error{Op: op, Generation: k.gen, Err: errOpts("hash %v is not linked into the program: import its package", h)}
		}
		w := h.New()
		w.Write(msg)
		sig, err := k.sign(w.Sum(nil), opts)
		if err == nil || k.mechs.rawAllowed(s) {
			return sig, err
		}
		// The token refused the raw mechanism just now (remembered): its
		// combined one.
		if mech, err = k.messageMech(s, h); err != nil {
			return nil, &Error{Op: op, Generation: k.gen, Err: err}
		}
	}
	spec, err := k.combinedSpec(s, mech, h, msg, opts)
	if err != nil {
		return nil, &Error{Op: op, Generation: k.gen, Err: err}
	}
	sig, atInit, err := k.signBy(&spec)
	if code, ok := codeOf(err); ok && atInit && refusesMech(code) {
		return nil, &Error{Op: op, Code: code, Generation: k.gen, Err: wrapf(pkcs11.Error(code),
			"the token refuses %s for %s too (%s)", mechName(mech), k.ref, k.whyNotRaw(s))}
	}
	return sig, err
}

// messageScheme is the scheme and hash of a message signature with opts
// (not nil) by k, an RSA or ECDSA key.
func (k *key) messageScheme(opts crypto.SignerOpts) (scheme, crypto.Hash, error) {
	s := schemeECDSA
	var h crypto.Hash
	if pss, ok := opts.(*rsa.PSSOptions); ok && k.kind == kindRSA {
		s, h = schemePSS, pss.Hash
	} else {
		if k.kind == kindRSA {
			s = schemePKCS1
		}
		var err error
		if h, err = hashFunc(opts); err != nil {
			return 0, 0, err
		}
	}
	if h == 0 {
		// crypto.MessageSigner: "SignMessage should only accept a zero
		// opts.HashFunc if the Signer would also accept messages which
		// are not pre-hashed"; an RSA or ECDSA key's Sign takes only a
		// digest (made by the caller, with crypto.Hash(0)).
		return 0, 0, errOpts("opts.HashFunc() is 0: SignMessage hashes the message with it (an %v key signs only digests): name the hash, e.g. crypto.SHA256, or *rsa.PSSOptions with Hash", k.kind)
	}
	if _, ok := hashSize(h); !ok {
		return 0, 0, errOpts("hash %v is not supported", h)
	}
	return s, h, nil
}

// messageMech chooses how k signs a message under s with hash h: 0 to
// hash it here and sign the digest with the raw mechanism, as Sign does,
// else the token's combined mechanism; an error when the key may use
// neither.
func (k *key) messageMech(s scheme, h crypto.Hash) (uint, error) {
	if k.mechs.rawAllowed(s) {
		return 0, nil
	}
	mech, ok := combinedMechs[s][h]
	switch {
	case !ok:
		return 0, errOpts("%s cannot sign with %s (%s), and PKCS#11 has no mechanism that hashes with %v and signs %v (SHA-1, SHA-224, SHA-256, SHA-384 and SHA-512 have)",
			k.ref, mechName(rawMechs[s]), k.whyNotRaw(s), h, s)
	case !k.mechs.allows(mech):
		return 0, errOpts("%s cannot sign %v with %v: %s, neither %s nor %s",
			k.ref, s, h, k.whyNotRaw(s), mechName(rawMechs[s]), mechName(mech))
	}
	return mech, nil
}

// combinedSpec is the signature of msg with the combined mechanism mech
// of scheme s and hash h.
func (k *key) combinedSpec(s scheme, mech uint, h crypto.Hash, msg []byte, opts crypto.SignerOpts) (signSpec, error) {
	spec := signSpec{scheme: s, combined: mech, input: msg}
	switch s {
	case schemePSS:
		hashMech, mgf, salt, err := k.pssParams(h, opts.(*rsa.PSSOptions))
		if err != nil {
			return signSpec{}, err
		}
		spec.pssHash, spec.pssMGF, spec.pssSalt = hashMech, mgf, salt
	case schemePKCS1:
		if n := len(pkcs1Prefix[h]) + h.Size(); n+11 > k.size {
			return signSpec{}, errOpts("%d bytes of DigestInfo do not fit a %d-bit RSA key (rsa.ErrMessageTooLong)", n, k.size*8)
		}
	}
	return spec, nil
}
