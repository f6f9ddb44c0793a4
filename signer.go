package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"fmt"
	"reflect"

	"github.com/miekg/pkcs11"
)

// Signer looks up the private key ref in the current generation. Exactly one
// private key must match (ErrKeyNotFound, ErrAmbiguousKey), it must allow
// signing, and its public key must be readable from the private key object,
// its public key object (same CKA_ID) or a certificate with the same CKA_ID.
// A key whose public key does not come from its private key object (EC,
// Ed25519) must prove it: one signature of a random challenge, on the
// token, that verifies under that public key; a mismatched pair is refused
// with ErrKeyMismatch. The key is bound to the current generation (see
// Signer); DurableSigner gives one that lasts. It makes a few PKCS#11 calls
// and may block as long as they do.
func (p *Provider) Signer(ref KeyRef) (*Signer, error) {
	k, err := p.lookup(ref)
	if err != nil {
		return nil, err
	}
	if !k.canSign {
		return nil, opErr("find key", k.gen, ErrUnsupportedKey, "%s does not allow signing (CKA_SIGN is false)", k.ref)
	}
	return &Signer{k}, nil
}

func (k *key) describe() string {
	switch pub := k.pub.(type) {
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", pub.N.BitLen())
	case *ecdsa.PublicKey:
		return "ECDSA " + pub.Curve.Params().Name
	}
	return k.kind.String()
}

// pubOrderBits returns the bit length of an ECDSA key's group order.
func (k *key) pubOrderBits() int { return k.pub.(*ecdsa.PublicKey).Curve.Params().N.BitLen() }

func (k *key) sign(digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	const op = "sign"
	// Everything of the caller's (opts, its HashFunc) is looked at here,
	// before the operation holds a session: bad input is refused without a
	// PKCS#11 call, whatever the provider's state.
	if !k.canSign {
		return nil, opErr(op, k.gen, ErrUnsupportedKey, "%s does not allow signing (CKA_SIGN is false)", k.ref)
	}
	spec, err := k.signSpec(digest, opts)
	if err != nil {
		return nil, &Error{Op: op, Generation: k.gen, Err: err}
	}
	if !k.mechs.rawAllowed(spec.scheme) {
		// Restricted to hash-and-sign mechanisms (message.go): a digest
		// cannot be signed.
		return nil, k.digestRefused(spec.scheme, 0)
	}
	sig, atInit, err := k.signBy(&spec)
	if code, refused := k.learn(spec.scheme, atInit, err); refused {
		return nil, k.digestRefused(spec.scheme, code)
	}
	return sig, err
}

// signBy makes the signature spec says with k, on a session of k's
// generation: C_SignInit and C_Sign, two PKCS#11 calls where the module's
// function list could be validated (fastsign.go). atInit says whether a
// failure came before C_Sign.
func (k *key) signBy(spec *signSpec) (sig []byte, atInit bool, err error) {
	const op = "sign"
	atInit = true
	err = k.p.run(k.gen, k.signRefusals, k.p.cfg.SessionWaitTimeout, runOp, func(in *instance, s pkcs11.SessionHandle) error {
		mech, input := spec.build()
		var err error
		if fl := k.p.fast; fl != nil && !k.alwaysAuth {
			sig, atInit, err = fastSign(fl, s, mech[0], k.handle, input, k.size)
			return err
		}
		if err := in.ctx.SignInit(s, mech, k.handle); err != nil {
			return err
		}
		atInit = false
		if err := k.contextLogin(in, s); err != nil {
			return err
		}
		if sig, err = in.ctx.Sign(s, input); err != nil {
			return mayBeActive(err)
		}
		return nil
	})
	if err != nil {
		return nil, atInit, err
	}
	if k.kind == kindECDSA {
		sig, err = k.ecdsaDER(sig)
		return sig, false, err
	}
	if len(sig) != k.size {
		return nil, false, opErr(op, k.gen, fmt.Errorf("token returned a %d-byte signature, want %d", len(sig), k.size), "")
	}
	return sig, false, nil
}

// Mechanisms without parameters, shared by every signature (read only).
var (
	mechECDSA   = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
	mechEdDSA   = []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}
	mechRSAPKCS = []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}
)

// signSpec is a validated signature request: what build turns into the
// mechanism and the data for C_Sign. It holds nothing of the caller's but
// the digest (or the message).
type signSpec struct {
	scheme scheme
	// mech is the raw mechanism, without parameters (PKCS #1 v1.5, ECDSA,
	// EdDSA); nil for PSS, and unused with combined.
	mech []*pkcs11.Mechanism
	// combined, when not 0, is the token's hash-and-sign mechanism
	// (message.go), and input the whole message.
	combined uint
	input    []byte // the digest, or the message
	prefix   []byte // PKCS #1 v1.5 over a digest: the DigestInfo prefix, or nil
	// PSS parameters.
	pssHash, pssMGF, pssSalt uint
}

// build returns the mechanism and the data to pass to C_Sign.
func (s *signSpec) build() ([]*pkcs11.Mechanism, []byte) {
	switch {
	case s.scheme == schemePSS:
		mech := uint(pkcs11.CKM_RSA_PKCS_PSS)
		if s.combined != 0 {
			mech = s.combined
		}
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, pkcs11.NewPSSParams(s.pssHash, s.pssMGF, s.pssSalt))}, s.input
	case s.combined != 0:
		return []*pkcs11.Mechanism{pkcs11.NewMechanism(s.combined, nil)}, s.input
	case s.prefix == nil:
		return s.mech, s.input
	}
	input := make([]byte, 0, len(s.prefix)+len(s.input))
	return s.mech, append(append(input, s.prefix...), s.input...)
}

// contextLogin logs in for the one operation just initialized on s, for a
// key with CKA_ALWAYS_AUTHENTICATE (C_Login with CKU_CONTEXT_SPECIFIC, as
// the standard asks, and as pkcs11key does). A failure leaves the operation
// active: the session is closed. A PIN error is never retried.
func (k *key) contextLogin(in *instance, s pkcs11.SessionHandle) error {
	if !k.alwaysAuth {
		return nil
	}
	if err := in.ctx.Login(s, pkcs11.CKU_CONTEXT_SPECIFIC, k.p.cfg.PIN); err != nil {
		return mayBeActive(stepErr("C_Login (CKU_CONTEXT_SPECIFIC, for a key with CKA_ALWAYS_AUTHENTICATE)", err))
	}
	return nil
}

func errOpts(format string, args ...any) error {
	return wrapf(ErrInvalidOptions, format, args...)
}

// signSpec validates opts and digest for the key.
func (k *key) signSpec(digest []byte, opts crypto.SignerOpts) (signSpec, error) {
	if isNil(opts) {
		return signSpec{}, errOpts("opts is %s: pass the hash the digest was made with (e.g. crypto.SHA256), *rsa.PSSOptions, or crypto.Hash(0) for Ed25519", nilName(opts))
	}
	if pss, ok := opts.(*rsa.PSSOptions); ok && k.kind == kindRSA {
		return k.pssSpec(digest, pss)
	}
	h, err := hashFunc(opts)
	if err != nil {
		return signSpec{}, err
	}
	switch k.kind {
	case kindRSA:
		return k.pkcs1Spec(digest, h)
	case kindECDSA:
		return k.ecdsaSpec(digest, h)
	case kindEd25519:
		if eo, ok := opts.(*ed25519.Options); ok && (eo.Hash != 0 || eo.Context != "") {
			return signSpec{}, errOpts("Ed25519ph and Ed25519ctx are not supported, only pure Ed25519 (ed25519.Options with Hash 0 and no Context)")
		}
		if h != 0 {
			return signSpec{}, errOpts("Ed25519 signs the whole message: opts.HashFunc() must be crypto.Hash(0), not %v", h)
		}
		return signSpec{scheme: schemeEdDSA, mech: mechEdDSA, input: digest}, nil
	}
	return signSpec{}, wrapf(ErrUnsupportedKey, "%v", k.kind)
}

// DigestInfo prefixes of PKCS #1 v1.5, as in crypto/rsa.
var pkcs1Prefix = map[crypto.Hash][]byte{
	crypto.MD5:        {0x30, 0x20, 0x30, 0x0c, 0x06, 0x08, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x05, 0x05, 0x00, 0x04, 0x10},
	crypto.SHA1:       {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14},
	crypto.SHA224:     {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c},
	crypto.SHA256:     {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA384:     {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA512:     {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
	crypto.SHA512_224: {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x05, 0x05, 0x00, 0x04, 0x1c},
	crypto.SHA512_256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x06, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA3_224:   {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x07, 0x05, 0x00, 0x04, 0x1c},
	crypto.SHA3_256:   {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA3_384:   {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x09, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA3_512:   {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x0a, 0x05, 0x00, 0x04, 0x40},
	crypto.MD5SHA1:    {}, // TLS 1.0/1.1: no DigestInfo
	crypto.RIPEMD160:  {0x30, 0x20, 0x30, 0x08, 0x06, 0x06, 0x28, 0xcf, 0x06, 0x03, 0x00, 0x31, 0x04, 0x14},
}

func checkDigest(digest []byte, h crypto.Hash) error {
	if h == 0 {
		return nil
	}
	n, ok := hashSize(h)
	if !ok {
		return errOpts("hash %v is not supported", h)
	}
	if len(digest) != n {
		return errOpts("digest is %d bytes, %v digests are %d", len(digest), h, n)
	}
	return nil
}

// hashSize is h.Size() for the hashes crypto defines, and false for any
// other value, where h.Size() panics.
func hashSize(h crypto.Hash) (int, bool) {
	if h == 0 || h > crypto.BLAKE2b_512 {
		return 0, false
	}
	return h.Size(), true
}

// isNil reports whether opts is nil or a nil pointer, whose HashFunc (and
// fields) would panic: (*rsa.PSSOptions)(nil) and the like.
func isNil(opts any) bool {
	switch o := opts.(type) {
	case nil:
		return true
	case crypto.Hash:
		return false
	case *rsa.PSSOptions:
		return o == nil
	case *ed25519.Options:
		return o == nil
	case *rsa.OAEPOptions:
		return o == nil
	//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption options.
	case *rsa.PKCS1v15DecryptOptions:
		return o == nil
	}
	v := reflect.ValueOf(opts)
	return v.Kind() == reflect.Pointer && v.IsNil()
}

// hashFunc is opts.HashFunc(), or an error when a caller's implementation
// of it panics (a struct embedding a nil *rsa.PSSOptions, say).
func hashFunc(opts crypto.SignerOpts) (h crypto.Hash, err error) {
	if h, ok := opts.(crypto.Hash); ok {
		return h, nil
	}
	defer func() {
		if r := recover(); r != nil {
			h, err = 0, errOpts("opts.HashFunc() of %T panicked: %v", opts, r)
		}
	}()
	return opts.HashFunc(), nil
}

// nilName names a nil opts for an error message: "nil" or "a nil *T".
func nilName(opts any) string {
	if opts == nil {
		return "nil"
	}
	return fmt.Sprintf("a nil %T", opts)
}

func (k *key) pkcs1Spec(digest []byte, h crypto.Hash) (signSpec, error) {
	spec := signSpec{scheme: schemePKCS1, mech: mechRSAPKCS, input: digest}
	if h != 0 {
		prefix, ok := pkcs1Prefix[h]
		if !ok {
			return signSpec{}, errOpts("hash %v is not supported for RSA PKCS #1 v1.5", h)
		}
		if err := checkDigest(digest, h); err != nil {
			return signSpec{}, err
		}
		spec.prefix = prefix
	}
	if n := len(spec.prefix) + len(digest); n+11 > k.size {
		return signSpec{}, errOpts("%d bytes of DigestInfo do not fit a %d-bit RSA key (rsa.ErrMessageTooLong)", n, k.size*8)
	}
	return spec, nil
}

// hashMechs maps a hash to its PKCS#11 digest mechanism and MGF1 function,
// for PSS and OAEP.
var hashMechs = map[crypto.Hash][2]uint{
	crypto.SHA1:   {pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1},
	crypto.SHA224: {pkcs11.CKM_SHA224, pkcs11.CKG_MGF1_SHA224},
	crypto.SHA256: {pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256},
	crypto.SHA384: {pkcs11.CKM_SHA384, pkcs11.CKG_MGF1_SHA384},
	crypto.SHA512: {pkcs11.CKM_SHA512, pkcs11.CKG_MGF1_SHA512},
}

func (k *key) pssSpec(digest []byte, o *rsa.PSSOptions) (signSpec, error) {
	h := o.HashFunc()
	if h == 0 {
		return signSpec{}, errOpts("rsa.PSSOptions.Hash is not set: name the hash the digest was made with")
	}
	if _, ok := hashMechs[h]; ok {
		if err := checkDigest(digest, h); err != nil {
			return signSpec{}, err
		}
	}
	hashMech, mgf, salt, err := k.pssParams(h, o)
	if err != nil {
		return signSpec{}, err
	}
	return signSpec{scheme: schemePSS, input: digest, pssHash: hashMech, pssMGF: mgf, pssSalt: salt}, nil
}

// pssParams are the CK_RSA_PKCS_PSS_PARAMS of a PSS signature with hash h
// (not 0) and o's salt length.
func (k *key) pssParams(h crypto.Hash, o *rsa.PSSOptions) (hashMech, mgf, salt uint, err error) {
	m, ok := hashMechs[h]
	if !ok {
		return 0, 0, 0, errOpts("hash %v is not supported for RSA-PSS (SHA-1, SHA-224, SHA-256, SHA-384, SHA-512 are)", h)
	}
	bits := k.pub.(*rsa.PublicKey).N.BitLen()
	maxSalt := (bits-1+7)/8 - 2 - h.Size()
	if maxSalt < 0 {
		return 0, 0, 0, errOpts("a %d-bit RSA key is too small for PSS with %v", bits, h)
	}
	var n int
	switch {
	case o.SaltLength == rsa.PSSSaltLengthAuto:
		n = maxSalt // what rsa.SignPSS does for PSSSaltLengthAuto
	case o.SaltLength == rsa.PSSSaltLengthEqualsHash:
		n = h.Size()
	case o.SaltLength < 0:
		return 0, 0, 0, errOpts("PSS salt length %d is invalid", o.SaltLength)
	default:
		n = o.SaltLength
	}
	if n > maxSalt {
		return 0, 0, 0, errOpts("PSS salt length %d is too long for a %d-bit key with %v (at most %d)", n, bits, h, maxSalt)
	}
	return m[0], m[1], uint(n), nil
}

func (k *key) ecdsaSpec(digest []byte, h crypto.Hash) (signSpec, error) {
	if len(digest) == 0 {
		return signSpec{}, errOpts("empty digest")
	}
	if err := checkDigest(digest, h); err != nil {
		return signSpec{}, err
	}
	// ECDSA uses the leftmost bits of a digest longer than the order
	// (ecdsa.SignASN1 does the same). For P-256 and P-384 those are whole
	// bytes; no standard digest is longer than P-521's order.
	if n := k.size / 2; len(digest) > n && k.pubOrderBits()%8 == 0 {
		digest = digest[:n]
	}
	return signSpec{scheme: schemeECDSA, mech: mechECDSA, input: digest}, nil
}

// ecdsaDER converts the token's r||s into the ASN.1 DER form of
// ecdsa.SignASN1: SEQUENCE { INTEGER r, INTEGER s }, minimal encodings.
func (k *key) ecdsaDER(sig []byte) ([]byte, error) {
	if len(sig) != k.size {
		return nil, opErr("sign", k.gen, fmt.Errorf("token returned a %d-byte ECDSA signature, want %d", len(sig), k.size), "")
	}
	der := derSignature(sig[:k.size/2], sig[k.size/2:])
	if der == nil {
		return nil, opErr("sign", k.gen, fmt.Errorf("token returned an ECDSA signature with a zero component"), "")
	}
	return der, nil
}

// derSignature encodes the big-endian integers r and s as a DER SEQUENCE of
// two INTEGERs, in one allocation; nil if either is zero.
func derSignature(r, s []byte) []byte {
	r, s = trimZeros(r), trimZeros(s)
	if len(r) == 0 || len(s) == 0 {
		return nil
	}
	intLen := func(v []byte) int { return 2 + len(v) + int(v[0]>>7) } // tag, length, pad
	body := intLen(r) + intLen(s)                                     // at most 2*(2+67): below 256
	out := make([]byte, 0, 3+body)
	out = append(out, 0x30)
	if body >= 0x80 {
		out = append(out, 0x81)
	}
	out = append(out, byte(body))
	for _, v := range [][]byte{r, s} {
		out = append(out, 0x02, byte(len(v)+int(v[0]>>7)))
		if v[0]&0x80 != 0 {
			out = append(out, 0) // keep the INTEGER positive
		}
		out = append(out, v...)
	}
	return out
}

func trimZeros(b []byte) []byte {
	for len(b) > 0 && b[0] == 0 {
		b = b[1:]
	}
	return b
}
