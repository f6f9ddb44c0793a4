// Package stepkms is a step-ca KMS (go.step.sm/crypto/kms/apiv1) for keys
// in a PKCS#11 HSM, built on package hsm, so that a CA survives the loss of
// its HSM: when the HSM is lost and comes back, the provider re-initializes
// the PKCS#11 library by itself, and the signers and decrypters this KMS
// hands out (hsm's durable keys) find their keys again and sign on, with no
// restart of step-ca. Step's own pkcs11 backend (crypto11) never recovers:
// every call fails with CKR_DEVICE_ERROR until the process restarts.
//
// It takes the URIs of step's pkcs11 backend, so that a ca.json written for
// that backend works unchanged:
//
//	kms uri:  pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=smallstep?pin-value=password
//	          pkcs11:serial=1a2b3c4d5e6f?pin-source=/path/to/pin.txt
//	          pkcs11:slot-id=5;max-sessions=10?pin-value=password
//	key name: pkcs11:id=7331;object=intermediate-key
//
// In the KMS URI, token, serial or slot-id selects the token (exactly one);
// module-path is the PKCS#11 module (path or query; default p11-kit's proxy,
// p11-kit-proxy.so, looked up in the library directories); the PIN is
// pin-value, else the file pin-source (trailing white space removed), else a
// terminal prompt (pin-prompt), else Options.Pin, as in step's backend; with
// none of them, the token is used without login. max-sessions bounds the
// sessions (default hsm.DefaultMaxSessions, lowered to what the token
// supports). An attribute step would ignore (a typo) is an error.
//
// In a key name, id is the CKA_ID, hexadecimal when it is a valid hex string
// (7331, 0x7331, 73:31) and otherwise its bytes as given (%73%31), and
// object is the CKA_LABEL, exactly as step reads them; other attributes are
// ignored. CreateKey and StoreCertificate need both, the others either.
//
// Call Register (see there) to make this the "pkcs11" KMS of a step-ca build.
// KMSes of one module and configuration share one hsm.Provider, so that
// step-ca's reload (SIGHUP), which opens the new KMS before it closes the
// old one, works; another configuration of an open module is refused (see
// New).
//
// Errors read "stepkms: operation name: cause" and match (errors.Is) the
// hsm sentinels of the cause (hsm.ErrKeyNotFound, hsm.ErrUnavailable,
// hsm.ErrPIN, hsm.ErrURI, ...), apiv1.NotFoundError and
// apiv1.AlreadyExistsError where step's KMSes return those, and this
// package's ErrInvalidRequest and ErrUnsupportedAlgorithm. No error shows a
// PIN.
package stepkms

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/ce46d8f2/hsm"
	"go.step.sm/crypto/kms/apiv1"
)

// Sentinel errors, matched with errors.Is.
var (
	// ErrInvalidRequest is returned for a nil request or a request with an
	// empty or incomplete field. No PKCS#11 call is made.
	ErrInvalidRequest = errors.New("stepkms: invalid request")

	// ErrUnsupportedAlgorithm is returned by CreateKey for a signature
	// algorithm or RSA key size it cannot make a key for. No PKCS#11 call is
	// made.
	ErrUnsupportedAlgorithm = errors.New("stepkms: unsupported signature algorithm")
)

// Compile-time checks of the step interfaces KMS implements.
var (
	_ apiv1.KeyManager           = (*KMS)(nil)
	_ apiv1.SearchableKeyManager = (*KMS)(nil)
	_ apiv1.CertificateManager   = (*KMS)(nil)
	_ apiv1.Decrypter            = (*KMS)(nil)
	_ apiv1.KeyDeleter           = (*KMS)(nil)
	_ apiv1.CertificateDeleter   = (*KMS)(nil)
	_ apiv1.KeyManagerNewFunc    = newKeyManager
)

// KMS is a step KMS on one token of a PKCS#11 module, through an
// hsm.Provider that it shares with the other KMSes of the process on the
// same module and configuration (see New). All methods are safe for
// concurrent use; each blocks for the PKCS#11 calls it makes (a key lookup,
// a generation). When the HSM is lost, the call that notices fails with an
// error matching hsm.ErrDeviceLost, and every later one fails fast with
// hsm.ErrUnavailable until the provider has re-initialized by itself.
type KMS struct {
	h *handle // nil for a KMS not made by New
}

// New opens the module and token opts.URI names (see the package
// documentation) and logs in. It has the signature of
// apiv1.KeyManagerNewFunc but for the result type. ctx is checked before
// opening; the opening itself is bounded by hsm.DefaultProbeTimeout.
//
// KMSes of one module and configuration (token, PIN, max-sessions, the
// settings of NewWithConfig) share one hsm.Provider, which the last Close
// closes: step-ca's reload opens the new KMS before it closes the old one.
// A KMS of another configuration of the module (another token, other
// settings) opens a Provider of its own, which shares the module (see
// hsm.Open): one C_Initialize, one re-initialization for all on an outage.
// The same token with another PIN is refused with an error matching
// hsm.ErrPIN, without a login attempt: Providers of one token share its
// login.
func New(ctx context.Context, opts apiv1.Options) (*KMS, error) {
	return NewWithConfig(ctx, opts, hsm.Config{})
}

// NewWithConfig is New with the settings of base (Logger, OnStateChange,
// timeouts, ...) for everything the URI does not say; the URI sets the
// module, the token selector, the PIN and, when given, MaxSessions. A
// shared provider keeps the Logger of the KMS that opened it; a base with
// an OnStateChange callback is not shared (a second KMS of it opens a
// Provider of its own).
func NewWithConfig(ctx context.Context, opts apiv1.Options, base hsm.Config) (*KMS, error) {
	const op = "open"
	if ctx == nil {
		ctx = context.Background()
	}
	if err := ctx.Err(); err != nil {
		return nil, &opError{op: op, msg: err.Error(), causes: []error{err}}
	}
	cfg, err := config(opts.URI, opts.Pin, base)
	if err != nil {
		return nil, at(op, err)
	}
	h, err := acquire(ctx, cfg)
	if err != nil {
		return nil, err
	}
	k := &KMS{h: h}
	track(k)
	return k, nil
}

// Register makes New, with hsm's state changes (HSM lost, recovered) logged
// to slog.Default, the KMS of type apiv1.PKCS11, so that a step-ca build
// gets the recovering backend with one import and one call:
//
//	import "github.com/ce46d8f2/hsm/stepkms"
//
//	func main() {
//		stepkms.Register() // before the CA is set up
//		...
//	}
//
// It replaces step's own pkcs11 backend (go.step.sm/crypto/kms/pkcs11, which
// registers itself in its init) for the whole process: every kms.New with
// type pkcs11, or a pkcs11: URI, then opens a KMS of this package. Call it
// after package initialization (from main), so that it comes after that
// init. Safe for concurrent use; the last registration wins.
func Register() {
	apiv1.Register(apiv1.PKCS11, registered)
}

func registered(ctx context.Context, opts apiv1.Options) (apiv1.KeyManager, error) {
	k, err := NewWithConfig(ctx, opts, hsm.Config{Logger: slog.Default()})
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return k, nil
}

// newKeyManager is New as an apiv1.KeyManagerNewFunc.
func newKeyManager(ctx context.Context, opts apiv1.Options) (apiv1.KeyManager, error) {
	k, err := New(ctx, opts)
	if err != nil {
		return nil, err
	}
	return k, nil
}

// Provider returns the hsm.Provider behind the KMS, for its health
// (State, WaitHealthy, ReadyHandler, Stats) and for what the KMS interfaces
// do not cover. It is shared with the other KMSes of the same module and
// configuration: closing it closes all of them (use Close instead), and it
// stays open after this KMS's Close while another KMS uses it. Hold the KMS
// while using its provider: a KMS dropped without Close gives its
// reference back when it is garbage collected.
func (k *KMS) Provider() *hsm.Provider {
	if k == nil || k.h == nil {
		return nil
	}
	return k.h.s.p
}

// GetPublicKey returns the public key of the private key req.Name names.
func (k *KMS) GetPublicKey(req *apiv1.GetPublicKeyRequest) (crypto.PublicKey, error) {
	const op = "get public key"
	if req == nil {
		return nil, invalid(op, "nil request")
	}
	p, ref, err := k.key(op, req.Name)
	if err != nil {
		return nil, err
	}
	s, err := p.Signer(ref)
	if err != nil {
		return nil, fail(op, req.Name, err)
	}
	return s.Public(), nil
}

// CreateKey generates a key pair on the token, with the CKA_ID and CKA_LABEL
// req.Name gives (both are required), for req.SignatureAlgorithm:
//
//   - unspecified, ECDSAWithSHA256: ECDSA P-256 (step's default);
//   - ECDSAWithSHA384: P-384; ECDSAWithSHA512: P-521;
//   - SHA256/384/512WithRSA and SHA256/384/512WithRSAPSS: RSA of req.Bits
//     bits, 2048, 3072 or 4096, default 3072 (step's DefaultRSASize); the key
//     signs and decrypts (CreateDecrypter), as crypto11 makes them;
//   - PureEd25519: Ed25519 (which step's pkcs11 backend does not make).
//
// Other algorithms (ML-DSA of newer go.step.sm/crypto) fail with
// ErrUnsupportedAlgorithm. The private key is sensitive and not extractable
// unless req.Extractable. A key that already has the name's label or ID
// fails with an error matching apiv1.AlreadyExistsError and
// hsm.ErrKeyExists, as step's backend does; when the name gives only one of
// them and a key has it, too. The response is step's: Name, PublicKey and
// CreateSignerRequest{SigningKey: Name}.
//
// It blocks for the generation (an RSA-4096 key can take seconds). If the
// HSM is lost during it, the key may or may not have been made: after
// recovery, a retry either makes it or fails with AlreadyExistsError.
func (k *KMS) CreateKey(req *apiv1.CreateKeyRequest) (*apiv1.CreateKeyResponse, error) {
	const op = "create key"
	switch {
	case req == nil:
		return nil, invalid(op, "nil request")
	case req.Bits < 0:
		return nil, invalid(op, "bits %d is negative", req.Bits)
	}
	p, ref, err := k.key(op, req.Name)
	if err != nil {
		return nil, err
	}
	if len(ref.ID) == 0 || ref.Label == "" {
		if _, err := p.Signer(ref); err == nil {
			return nil, fail(op, req.Name, hsm.ErrKeyExists)
		}
		return nil, invalid(op, "key name %s: give both id and object", redact(req.Name))
	}
	typ, err := keyType(req.SignatureAlgorithm, req.Bits)
	if err != nil {
		return nil, at(op+" "+redact(req.Name), err)
	}
	s, err := p.GenerateKey(hsm.KeySpec{
		Type:        typ,
		Label:       ref.Label,
		ID:          ref.ID,
		Decrypt:     typ == hsm.RSA2048 || typ == hsm.RSA3072 || typ == hsm.RSA4096,
		Extractable: req.Extractable,
	})
	if err != nil {
		return nil, fail(op, req.Name, err)
	}
	return &apiv1.CreateKeyResponse{
		Name:      req.Name,
		PublicKey: s.Public(),
		CreateSignerRequest: apiv1.CreateSignerRequest{
			SigningKey: req.Name,
		},
	}, nil
}

// defaultRSABits is the size of an RSA key when CreateKeyRequest.Bits is
// zero, as in step's pkcs11 backend.
const defaultRSABits = 3072

// keyType returns the hsm key type for a step signature algorithm.
func keyType(alg apiv1.SignatureAlgorithm, bits int) (hsm.KeyType, error) {
	switch alg {
	case apiv1.UnspecifiedSignAlgorithm, apiv1.ECDSAWithSHA256:
		return hsm.ECDSAP256, nil
	case apiv1.ECDSAWithSHA384:
		return hsm.ECDSAP384, nil
	case apiv1.ECDSAWithSHA512:
		return hsm.ECDSAP521, nil
	case apiv1.PureEd25519:
		return hsm.Ed25519, nil
	case apiv1.SHA256WithRSA, apiv1.SHA384WithRSA, apiv1.SHA512WithRSA,
		apiv1.SHA256WithRSAPSS, apiv1.SHA384WithRSAPSS, apiv1.SHA512WithRSAPSS:
		switch bits {
		case 0, 3072:
			return hsm.RSA3072, nil
		case 2048:
			return hsm.RSA2048, nil
		case 4096:
			return hsm.RSA4096, nil
		}
		return 0, &opError{msg: fmt.Sprintf("%s with %d bits: RSA keys have 2048, 3072 or 4096 bits (0 means %d)", alg, bits, defaultRSABits),
			causes: []error{ErrUnsupportedAlgorithm}}
	}
	return 0, &opError{msg: fmt.Sprintf("signature algorithm %s is not supported: use ECDSA-SHA256/384/512, SHA256/384/512-RSA, SHA256/384/512-RSAPSS or Ed25519", alg),
		causes: []error{ErrUnsupportedAlgorithm}}
}

// CreateSigner returns a durable signer (an hsm.ContextSigner over an
// *hsm.DurableSigner) for the key req.SigningKey names: it survives HSM
// outages, finding its key again after each re-initialization and proving,
// with a signature of a random challenge, that it is the same key (another
// is refused with hsm.ErrKeyChanged). During an outage its Sign fails fast
// with an error matching hsm.ErrUnavailable, and signs again once the
// provider has recovered; its SignContext waits for that. Sign with nil
// opts fails for RSA keys (no panic). After the KMS's Close it fails with
// an error matching hsm.ErrClosed.
func (k *KMS) CreateSigner(req *apiv1.CreateSignerRequest) (crypto.Signer, error) {
	return k.createSigner(req)
}

// createSigner is CreateSigner, typed as what it returns.
func (k *KMS) createSigner(req *apiv1.CreateSignerRequest) (hsm.ContextSigner, error) {
	const op = "create signer"
	if req == nil {
		return nil, invalid(op, "nil request")
	}
	p, ref, err := k.key(op, req.SigningKey)
	if err != nil {
		return nil, err
	}
	s, err := p.DurableSigner(ref)
	if err != nil {
		return nil, fail(op, req.SigningKey, err)
	}
	return &signer{k: k, d: s}, nil
}

// CreateDecrypter returns a durable decrypter (an hsm.ContextDecrypter
// over an *hsm.DurableDecrypter) for the RSA key req.DecryptionKey names,
// which must allow decryption (keys from CreateKey do). It decrypts
// RSA-OAEP (*rsa.OAEPOptions) and PKCS #1 v1.5 (nil or
// *rsa.PKCS1v15DecryptOptions), survives outages and fails after the KMS's
// Close as CreateSigner's signers do. An EC or Ed25519 key fails with an
// error matching hsm.ErrUnsupportedKey.
func (k *KMS) CreateDecrypter(req *apiv1.CreateDecrypterRequest) (crypto.Decrypter, error) {
	return k.createDecrypter(req)
}

// createDecrypter is CreateDecrypter, typed as what it returns.
func (k *KMS) createDecrypter(req *apiv1.CreateDecrypterRequest) (hsm.ContextDecrypter, error) {
	const op = "create decrypter"
	if req == nil {
		return nil, invalid(op, "nil request")
	}
	p, ref, err := k.key(op, req.DecryptionKey)
	if err != nil {
		return nil, err
	}
	d, err := p.DurableDecrypter(ref)
	if err != nil {
		return nil, fail(op, req.DecryptionKey, err)
	}
	return &decrypter{k: k, d: d}, nil
}

// LoadCertificate returns the certificate stored under req.Name: with the
// CKA_ID of the key the name names, or, when no key matches, with the
// name's id, else its object (label). A serial= attribute (hexadecimal, as
// in step) must then match the certificate's serial number; a name with
// only a serial is refused (hsm looks certificates up by ID or label).
// A certificate not found matches apiv1.NotFoundError.
func (k *KMS) LoadCertificate(req *apiv1.LoadCertificateRequest) (*x509.Certificate, error) {
	const op = "load certificate"
	if req == nil {
		return nil, invalid(op, "nil request")
	}
	p, err := k.provider(op)
	if err != nil {
		return nil, err
	}
	if req.Name == "" {
		return nil, invalid(op, "name is empty")
	}
	u, err := parse("certificate name", req.Name)
	if err != nil {
		return nil, at(op, err)
	}
	serial, err := certSerial(u, req.Name)
	if err != nil {
		return nil, at(op, err)
	}
	ref := hsm.KeyRef{ID: u.GetEncoded("id"), Label: u.Get("object")}
	if len(ref.ID) == 0 && ref.Label == "" {
		if serial != nil {
			return nil, &opError{op: op + " " + redact(req.Name), msg: "a certificate is looked up by id or object: give one with the serial",
				causes: []error{ErrInvalidRequest, apiv1.NotImplementedError{}}}
		}
		return nil, invalid(op, "certificate name %s: give id, object or both", redact(req.Name))
	}
	cert, err := p.Certificate(ref)
	if err != nil {
		return nil, fail(op, req.Name, err)
	}
	if serial != nil && cert.SerialNumber.Cmp(serial) != 0 {
		return nil, &opError{op: op + " " + redact(req.Name), msg: fmt.Sprintf("the certificate has serial number %x, not %x", cert.SerialNumber, serial),
			causes: []error{hsm.ErrKeyNotFound, apiv1.NotFoundError{Message: redact(req.Name) + " not found"}}}
	}
	return cert, nil
}

// StoreCertificate stores req.Certificate on the token with the CKA_ID and
// CKA_LABEL req.Name gives (both are required, as in step's backend). When
// the name names a key (same ID and label), the certificate must be for
// that key. A certificate already under the ID fails with an error matching
// apiv1.AlreadyExistsError. req.Extractable is ignored: a certificate holds
// no secret.
func (k *KMS) StoreCertificate(req *apiv1.StoreCertificateRequest) error {
	const op = "store certificate"
	switch {
	case req == nil:
		return invalid(op, "nil request")
	case req.Certificate == nil:
		return invalid(op, "certificate is nil")
	}
	p, ref, err := k.key(op, req.Name)
	if err != nil {
		return err
	}
	if len(ref.ID) == 0 || ref.Label == "" {
		return invalid(op, "certificate name %s: give both id and object", redact(req.Name))
	}
	if err := p.ImportCertificate(ref, req.Certificate); err != nil {
		return fail(op, req.Name, err)
	}
	return nil
}

// DeleteKey deletes the private key req.Name names and its public key. A
// certificate stored for it stays (DeleteCertificate). A key not found
// fails with an error matching apiv1.NotFoundError and hsm.ErrKeyNotFound.
// Signers and decrypters of the key fail from then on.
func (k *KMS) DeleteKey(req *apiv1.DeleteKeyRequest) error {
	const op = "delete key"
	if req == nil {
		return invalid(op, "nil request")
	}
	p, ref, err := k.key(op, req.Name)
	if err != nil {
		return err
	}
	if err := p.DeleteKey(ref); err != nil {
		return fail(op, req.Name, err)
	}
	return nil
}

// DeleteCertificate deletes the certificate LoadCertificate would load for
// req.Name. A certificate not found fails with an error matching
// apiv1.NotFoundError.
func (k *KMS) DeleteCertificate(req *apiv1.DeleteCertificateRequest) error {
	const op = "delete certificate"
	if req == nil {
		return invalid(op, "nil request")
	}
	p, ref, err := k.key(op, req.Name)
	if err != nil {
		return err
	}
	if err := p.DeleteCertificate(ref); err != nil {
		return fail(op, req.Name, err)
	}
	return nil
}

// SearchKeys lists the private keys on the token that req.Query selects:
// "pkcs11:" for all, or with id and/or object to filter (matched exactly,
// read as in key names). Each result is named pkcs11:id=HEX;object=LABEL
// (what the key has of the two), with its public key and a
// CreateSignerRequest for that name. Keys that cannot be named (neither ID
// nor label), used (an unsupported type) or told apart (two keys with the
// same ID and label) are left out.
func (k *KMS) SearchKeys(req *apiv1.SearchKeysRequest) (*apiv1.SearchKeysResponse, error) {
	const op = "search keys"
	if req == nil {
		return nil, invalid(op, "nil request")
	}
	p, err := k.provider(op)
	if err != nil {
		return nil, err
	}
	if req.Query == "" {
		return nil, invalid(op, "query is empty (pkcs11: lists every key)")
	}
	u, err := parse("search query", req.Query)
	if err != nil {
		return nil, at(op, err)
	}
	id, label := u.GetEncoded("id"), u.Get("object")
	keys, err := p.Keys()
	if err != nil {
		return nil, fail(op, req.Query, err)
	}
	resp := &apiv1.SearchKeysResponse{Results: []apiv1.SearchKeyResult{}}
	for _, key := range keys {
		switch {
		case len(key.Ref.ID) == 0 && key.Ref.Label == "",
			id != nil && string(id) != string(key.Ref.ID),
			label != "" && label != key.Ref.Label,
			!key.CanSign && !key.CanDecrypt:
			continue
		}
		var pub crypto.PublicKey
		if key.CanSign {
			var s *hsm.Signer
			if s, err = p.Signer(key.Ref); err == nil {
				pub = s.Public()
			}
		} else {
			var d *hsm.Decrypter
			if d, err = p.Decrypter(key.Ref); err == nil {
				pub = d.Public()
			}
		}
		switch {
		case errors.Is(err, hsm.ErrAmbiguousKey), errors.Is(err, hsm.ErrUnsupportedKey), errors.Is(err, hsm.ErrKeyNotFound),
			errors.Is(err, hsm.ErrKeyMismatch):
			continue // not usable by name (a mismatched pair neither), or deleted meanwhile
		case err != nil:
			return nil, fail(op, req.Query, err)
		}
		name := keyName(key.Ref)
		resp.Results = append(resp.Results, apiv1.SearchKeyResult{
			Name:                name,
			PublicKey:           pub,
			CreateSignerRequest: apiv1.CreateSignerRequest{SigningKey: name},
		})
	}
	return resp, nil
}

// Close closes the KMS: its methods, signers and decrypters fail from then
// on with an error matching hsm.ErrClosed (an operation already under way
// completes). The last KMS of a shared provider also closes the provider:
// it logs out and finalizes the PKCS#11 library, after which the module
// can be opened again; that waits for operations in flight, within
// hsm.DefaultDrainTimeout plus hsm.DefaultProbeTimeout. Calling it again
// is harmless.
func (k *KMS) Close() error {
	if k == nil || k.h == nil || !k.h.closed.CompareAndSwap(false, true) {
		return nil
	}
	return k.h.release()
}

// open returns an error matching hsm.ErrClosed once k is closed (or its
// shared provider was closed directly), an ErrInvalidRequest for a KMS not
// made by New.
func (k *KMS) open(op string) error {
	switch {
	case k == nil || k.h == nil:
		return invalid(op, "the KMS was not made by New")
	case k.h.closed.Load():
		return &opError{op: op, msg: "the KMS is closed", causes: []error{hsm.ErrClosed}}
	}
	return nil
}

// provider returns k's provider, or an error for a KMS not made by New or
// closed.
func (k *KMS) provider(op string) (*hsm.Provider, error) {
	if err := k.open(op); err != nil {
		return nil, err
	}
	return k.h.s.p, nil
}

// key returns k's provider and the key name parsed.
func (k *KMS) key(op, name string) (*hsm.Provider, hsm.KeyRef, error) {
	p, err := k.provider(op)
	if err != nil {
		return nil, hsm.KeyRef{}, err
	}
	if name == "" {
		return nil, hsm.KeyRef{}, invalid(op, "name is empty")
	}
	id, label, _, err := object(name)
	if err != nil {
		return nil, hsm.KeyRef{}, at(op, err)
	}
	return p, hsm.KeyRef{ID: id, Label: label}, nil
}

// opError is every error of this package: "stepkms: op: msg", matching
// each of causes.
type opError struct {
	op, msg string
	causes  []error
}

func (e *opError) Error() string {
	if e.op == "" {
		return "stepkms: " + e.msg
	}
	return "stepkms: " + e.op + ": " + e.msg
}

func (e *opError) Unwrap() []error { return e.causes }

// at returns err with op, if it is an opError without one.
func at(op string, err error) error {
	var e *opError
	if errors.As(err, &e) && e.op == "" {
		return &opError{op: op, msg: e.msg, causes: e.causes}
	}
	return err
}

func invalid(op, format string, args ...any) error {
	return &opError{op: op, msg: fmt.Sprintf(format, args...), causes: []error{ErrInvalidRequest}}
}

// fail wraps an error of hsm about name, adding step's error types where
// step's KMSes use them.
func fail(op, name string, err error) error {
	causes := []error{err}
	switch {
	case errors.Is(err, hsm.ErrKeyNotFound):
		causes = append(causes, apiv1.NotFoundError{Message: redact(name) + " not found"})
	case errors.Is(err, hsm.ErrKeyExists):
		causes = append(causes, apiv1.AlreadyExistsError{Message: redact(name) + " already exists"})
	}
	msg := err.Error()
	if err == hsm.ErrKeyExists {
		msg = "a key with its id or object is already on the token"
	}
	return &opError{op: op + " " + redact(name), msg: strings.TrimSpace(msg), causes: causes}
}
