package hsm

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// TestSignMessage: SignMessage of every type of key signs the message as
// Sign signs its digest (the same bytes where the scheme is deterministic:
// PKCS #1 v1.5, Ed25519), on both paths, and crypto.SignMessage calls it.
func TestSignMessage(t *testing.T) { forEachPath(t, testSignMessage) }

func testSignMessage(t *testing.T, p *Provider) {
	msg := []byte("the whole message, as crypto/x509 and crypto/tls hand it over")
	tests := []struct {
		key  string
		opts crypto.SignerOpts
	}{
		{"rsa2048", crypto.SHA256},
		{"rsa2048", crypto.SHA1},
		{"rsa2048", crypto.SHA512},
		{"rsa2048", crypto.SHA3_256},
		{"rsa3072", crypto.SHA384},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA512}},
		{"p256", crypto.SHA256},
		{"p256", crypto.SHA512},
		{"p384", crypto.SHA384},
		{"p521", crypto.SHA512},
		{"ed25519", crypto.Hash(0)},
		{"ed25519", &ed25519.Options{}},
	}
	for _, tt := range tests {
		t.Run(tt.key+"/"+optsName(tt.opts), func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			digest := hashOf(tt.opts.HashFunc(), msg)
			sig, err := s.SignMessage(nil, msg, tt.opts)
			if err != nil {
				t.Fatalf("SignMessage: %v", err)
			}
			if err := verify(s.Public(), digest, sig, tt.opts); err != nil {
				t.Fatalf("verify: %v", err)
			}
			via, err := crypto.SignMessage(s, rand.Reader, msg, tt.opts)
			if err != nil {
				t.Fatalf("crypto.SignMessage: %v", err)
			}
			if err := verify(s.Public(), digest, via, tt.opts); err != nil {
				t.Fatalf("crypto.SignMessage: verify: %v", err)
			}
			_, pss := tt.opts.(*rsa.PSSOptions)
			if s.k.kind != kindECDSA && !pss {
				// Deterministic: the very signature Sign makes.
				want, err := s.Sign(nil, digest, tt.opts)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(sig, want) {
					t.Fatal("SignMessage's signature is not Sign's of the digest")
				}
			}
		})
	}
}

// TestSignMessageBadInput: bad options are refused with ErrInvalidOptions,
// without a PKCS#11 call and without a panic.
func TestSignMessageBadInput(t *testing.T) {
	p := openShared(t)
	msg := []byte("m")
	tests := []struct {
		name, key, want string
		opts            crypto.SignerOpts
	}{
		{"nil opts RSA", "rsa2048", "opts is nil", nil},
		{"nil opts Ed25519", "ed25519", "opts is nil", nil},
		{"nil PSS options", "rsa2048", "opts is a nil *rsa.PSSOptions", (*rsa.PSSOptions)(nil)},
		{"Hash(0) RSA", "rsa2048", "SignMessage hashes the message", crypto.Hash(0)},
		{"Hash(0) ECDSA", "p256", "SignMessage hashes the message", crypto.Hash(0)},
		{"PSS without hash", "rsa2048", "SignMessage hashes the message", &rsa.PSSOptions{}},
		{"hash out of range", "p256", "not supported", crypto.Hash(99)},
		{"PSS salt too long", "rsa2048", "too long", &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 223}},
		{"PSS unsupported hash", "rsa2048", "not supported for RSA-PSS", &rsa.PSSOptions{Hash: crypto.SHA3_256}},
		{"Ed25519 with a hash", "ed25519", "crypto.Hash(0)", crypto.SHA256},
		{"Ed25519ph", "ed25519", "Ed25519ph", &ed25519.Options{Hash: crypto.SHA512}},
		{"panicking HashFunc", "p256", "panicked", struct{ *rsa.PSSOptions }{}},
	}
	if !crypto.MD4.Available() {
		tests = append(tests, struct {
			name, key, want string
			opts            crypto.SignerOpts
		}{"hash not linked", "p256", "not linked", crypto.MD4})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			ops := p.Stats().Operations
			sig, err := s.SignMessage(nil, msg, tt.opts)
			if sig != nil {
				t.Error("a signature returned with the error")
			}
			e := wantErr(t, err, ErrInvalidOptions)
			if e.Op != "sign" || e.Code != 0 || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v (%+v), want one saying %q", err, e, tt.want)
			}
			if p.Stats().Operations != ops {
				t.Error("a refused SignMessage made a PKCS#11 operation")
			}
			t.Log(err)
		})
	}
}

// The restricted token holds keys that may sign only with the mechanisms
// named (CKA_ALLOWED_MECHANISMS), made by GenerateKey with
// KeySpec.AllowedMechanisms. SoftHSM 2.6 enforces the list.
var restricted struct {
	sync.Mutex
	tok *softhsmtest.Token
}

var restrictedKeys = []KeySpec{
	{Label: "pss", Type: RSA2048, AllowedMechanisms: []uint{pkcs11.CKM_SHA256_RSA_PKCS_PSS, pkcs11.CKM_SHA384_RSA_PKCS_PSS, pkcs11.CKM_SHA512_RSA_PKCS_PSS}},
	{Label: "pkcs1", Type: RSA2048, AllowedMechanisms: []uint{pkcs11.CKM_SHA256_RSA_PKCS}},
	{Label: "hashsign", Type: RSA3072, AllowedMechanisms: []uint{
		pkcs11.CKM_SHA256_RSA_PKCS, pkcs11.CKM_SHA384_RSA_PKCS, pkcs11.CKM_SHA512_RSA_PKCS,
		pkcs11.CKM_SHA256_RSA_PKCS_PSS, pkcs11.CKM_SHA384_RSA_PKCS_PSS, pkcs11.CKM_SHA512_RSA_PKCS_PSS}},
	// SoftHSM 2.6 has no CKM_ECDSA_SHA256: this key cannot sign at all.
	{Label: "ecsha", Type: ECDSAP256, AllowedMechanisms: []uint{pkcs11.CKM_ECDSA_SHA256}},
	// Restricted, to the raw mechanism: signs digests, and messages hashed
	// here.
	{Label: "ecraw", Type: ECDSAP256, AllowedMechanisms: []uint{pkcs11.CKM_ECDSA}},
}

func restrictedToken(t testing.TB) *softhsmtest.Token {
	t.Helper()
	restricted.Lock()
	defer restricted.Unlock()
	if restricted.tok != nil {
		return restricted.tok
	}
	tok := softhsmtest.NewToken(t, "restricted")
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, spec := range restrictedKeys {
		s, err := p.GenerateKey(spec)
		if err != nil {
			t.Fatalf("GenerateKey(%s): %v", spec.Label, err)
		}
		if !sameMechanisms(s.k.mechs.allowed, spec.AllowedMechanisms) {
			t.Fatalf("%s: the key reads CKA_ALLOWED_MECHANISMS %s, want %s", spec.Label, mechList(s.k.mechs.allowed), mechList(spec.AllowedMechanisms))
		}
	}
	restricted.tok = tok
	return tok
}

func openRestricted(t testing.TB, mod ...func(*Config)) *Provider {
	t.Helper()
	return openToken(t, restrictedToken(t), mod...)
}

var pss256 = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}

// forEachRestrictedPath runs f on the restricted token on both paths
// (two-call, and miekg/pkcs11's, whose lookups read each object's
// attributes by class).
func forEachRestrictedPath(t *testing.T, f func(t *testing.T, p *Provider)) {
	for _, path := range []string{"two-call", "miekg"} {
		t.Run(path, func(t *testing.T) {
			p := openRestricted(t)
			if path == "miekg" {
				p.fast = nil
				p.inst.Load().fast = nil
			}
			f(t, p)
		})
	}
}

// TestRestrictedSign: Sign of a digest by a key restricted to
// hash-and-sign mechanisms fails at once, without a call, saying to use
// SignMessage; a key restricted to the raw mechanism signs digests.
func TestRestrictedSign(t *testing.T) {
	forEachRestrictedPath(t, func(t *testing.T, p *Provider) {
		d := sha256.Sum256([]byte("tbsCertificate"))
		for _, key := range []string{"pss", "pkcs1", "hashsign", "ecsha"} {
			s := mustSigner(t, p, key)
			ops := p.Stats().Operations
			opts := crypto.SignerOpts(crypto.SHA256)
			if key == "pss" {
				opts = pss256
			}
			_, err := s.Sign(nil, d[:], opts)
			e := wantErr(t, err, ErrUnsupportedKey)
			if !strings.Contains(err.Error(), "SignMessage") || !strings.Contains(err.Error(), "CKA_ALLOWED_MECHANISMS") || e.Code != 0 {
				t.Errorf("%s: Sign: %v, want an error that names the key's mechanisms and SignMessage", key, err)
			}
			if p.Stats().Operations != ops {
				t.Errorf("%s: Sign of a restricted key made a PKCS#11 call", key)
			}
			t.Logf("%s: Sign: %v", key, err)
		}
		// "ecraw" may use CKM_ECDSA: Sign signs.
		ecraw := mustSigner(t, p, "ecraw")
		if sig, err := ecraw.Sign(nil, d[:], crypto.SHA256); err != nil || verify(ecraw.Public(), d[:], sig, crypto.SHA256) != nil {
			t.Fatalf("ecraw: Sign: %v", err)
		}
	})
}

// TestRestrictedSignMessage: a key restricted to hash-and-sign mechanisms
// signs messages with them, on both paths; options the key's list does
// not allow are refused without a call, naming the list.
func TestRestrictedSignMessage(t *testing.T) {
	forEachRestrictedPath(t, func(t *testing.T, p *Provider) {
		msg := []byte("tbsCertificate")
		for _, c := range []struct {
			key  string
			opts crypto.SignerOpts
		}{
			{"pss", pss256},
			{"pss", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA384}},
			{"pss", &rsa.PSSOptions{SaltLength: 0, Hash: crypto.SHA512}},
			{"pkcs1", crypto.SHA256},
			{"hashsign", crypto.SHA512},
			{"hashsign", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA384}},
			{"ecraw", crypto.SHA256},
		} {
			s := mustSigner(t, p, c.key)
			sig, err := s.SignMessage(nil, msg, c.opts)
			if err != nil {
				t.Fatalf("%s %s: %v", c.key, optsName(c.opts), err)
			}
			if err := verify(s.Public(), hashOf(c.opts.HashFunc(), msg), sig, c.opts); err != nil {
				t.Fatalf("%s %s: %v", c.key, optsName(c.opts), err)
			}
			if s.k.mechs.refused.Load() != 0 {
				t.Errorf("%s: the raw mechanism was tried (and refused): the key's CKA_ALLOWED_MECHANISMS was not used", c.key)
			}
		}

		// What the key's list does not allow: refused without a call.
		for _, c := range []struct {
			key, want string
			opts      crypto.SignerOpts
		}{
			{"pss", "neither CKM_RSA_PKCS nor CKM_SHA256_RSA_PKCS", crypto.SHA256},
			{"pss", "neither CKM_RSA_PKCS_PSS nor CKM_SHA1_RSA_PKCS_PSS", &rsa.PSSOptions{Hash: crypto.SHA1}},
			{"pkcs1", "neither CKM_RSA_PKCS nor CKM_SHA384_RSA_PKCS", crypto.SHA384},
			{"pkcs1", "PKCS#11 has no mechanism that hashes with SHA3-256", crypto.SHA3_256},
		} {
			s := mustSigner(t, p, c.key)
			ops := p.Stats().Operations
			_, err := s.SignMessage(nil, msg, c.opts)
			wantErr(t, err, ErrInvalidOptions)
			if !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "CKA_ALLOWED_MECHANISMS") {
				t.Errorf("%s %s: %v, want one saying %q", c.key, optsName(c.opts), err, c.want)
			}
			if p.Stats().Operations != ops {
				t.Errorf("%s %s: a refused SignMessage made a PKCS#11 call", c.key, optsName(c.opts))
			}
			t.Logf("%s %s: %v", c.key, optsName(c.opts), err)
		}

		// The token refuses the combined mechanism too (SoftHSM has no
		// CKM_ECDSA_SHA256): its code, and words.
		ecsha := mustSigner(t, p, "ecsha")
		_, err := ecsha.SignMessage(nil, msg, crypto.SHA256)
		var code pkcs11.Error
		if !errors.As(err, &code) || code != pkcs11.CKR_MECHANISM_INVALID || !strings.Contains(err.Error(), "CKM_ECDSA_SHA256") {
			t.Errorf("ecsha: SignMessage: %v, want CKR_MECHANISM_INVALID naming CKM_ECDSA_SHA256", err)
		}
		t.Logf("ecsha: SignMessage: %v", err)
	})
}

// TestRestrictedLearned: a restricted key whose lookup did not read
// CKA_ALLOWED_MECHANISMS (a module that does not have it, such as NSS
// softokn: lookups read only what each object has, and have stopped
// asking for it) learns it from the token's first refusal of the raw
// mechanism, once, and from then on signs messages with the combined
// mechanism and refuses digests without a call.
func TestRestrictedLearned(t *testing.T) {
	p := openRestricted(t)
	p.inst.Load().strictAttrs.Store(true)
	p.inst.Load().noAllowed.Store(true)
	msg := []byte("learn")
	d := sha256.Sum256(msg)

	// Sign first: the refusal, with its code, and what to do.
	s := mustSigner(t, p, "pss")
	if s.k.mechs.allowed != nil {
		t.Fatal("the strict lookup read CKA_ALLOWED_MECHANISMS: nothing is learnt")
	}
	_, err := s.Sign(nil, d[:], pss256)
	e := wantErr(t, err, ErrUnsupportedKey)
	var code pkcs11.Error
	if !errors.As(err, &code) || code != pkcs11.CKR_MECHANISM_INVALID || e.Code != pkcs11.CKR_MECHANISM_INVALID || !strings.Contains(err.Error(), "SignMessage") {
		t.Errorf("Sign: %v, want ErrUnsupportedKey with CKR_MECHANISM_INVALID saying to use SignMessage", err)
	}
	t.Logf("Sign: %v", err)
	ops := p.Stats().Operations
	_, err = s.Sign(nil, d[:], pss256)
	wantErr(t, err, ErrUnsupportedKey)
	if p.Stats().Operations != ops {
		t.Error("the second Sign tried the refused mechanism again")
	}
	sig, err := s.SignMessage(nil, msg, pss256)
	if err != nil || verify(s.Public(), d[:], sig, pss256) != nil {
		t.Fatalf("SignMessage after the refusal: %v", err)
	}

	// SignMessage first, on a key found again: the refusal is learnt
	// inside the call, which signs all the same.
	s = mustSigner(t, p, "pkcs1")
	for i := range 2 {
		ops := p.Stats().Operations
		sig, err := s.SignMessage(nil, msg, crypto.SHA256)
		if err != nil || verify(s.Public(), d[:], sig, crypto.SHA256) != nil {
			t.Fatalf("SignMessage %d: %v", i, err)
		}
		if want := uint64(2 - i); p.Stats().Operations-ops != want {
			t.Errorf("SignMessage %d: %d operations, want %d (the refused raw one, once)", i, p.Stats().Operations-ops, want)
		}
	}
}

// spyMechs returns the mechanisms the spy logged C_SignInit with while f
// ran, and the number of PKCS#11 calls.
func spyMechs(t *testing.T, f func()) ([]string, int) {
	t.Helper()
	w := spyWindow(t, f)
	var mechs []string
	for _, m := range spySignInit.FindAllSubmatch(w, -1) {
		mechs = append(mechs, string(m[1]))
	}
	return mechs, len(spyCall.FindAll(w, -1))
}

var spySignInit = regexp.MustCompile(`(?m)^[0-9]+: C_SignInit\n(?:.*\n)*?.*pMechanism->type = (CKM_\w+)`)

// TestSignMessageMechanism counts, with pkcs11-spy, the calls of
// SignMessage, and reads which mechanism signed: a restricted key's very
// first SignMessage uses the combined mechanism its CKA_ALLOWED_MECHANISMS
// names, in two calls (hashing here would show the raw mechanism
// refused, and more calls); an unrestricted key's hashes here and signs
// with the raw mechanism, in two calls.
func TestSignMessageMechanism(t *testing.T) {
	useSpy(t)
	msg := []byte("count me")
	for _, tok := range []string{"shared", "restricted"} {
		t.Run(tok, func(t *testing.T) {
			var p *Provider
			cases := []struct {
				key  string
				opts crypto.SignerOpts
				mech string
			}{
				{"rsa2048", pss256, "CKM_RSA_PKCS_PSS"},
				{"rsa2048", crypto.SHA256, "CKM_RSA_PKCS"},
				{"p256", crypto.SHA256, "CKM_ECDSA"},
			}
			if tok == "shared" {
				p = openSpy(t)
			} else {
				p = openToken(t, restrictedToken(t), func(c *Config) { c.Path = spyModule; c.ProbeInterval = -1 })
				cases = []struct {
					key  string
					opts crypto.SignerOpts
					mech string
				}{
					{"pss", pss256, "CKM_SHA256_RSA_PKCS_PSS"},
					{"pkcs1", crypto.SHA256, "CKM_SHA256_RSA_PKCS"},
					{"hashsign", crypto.SHA384, "CKM_SHA384_RSA_PKCS"},
					{"ecraw", crypto.SHA256, "CKM_ECDSA"},
				}
			}
			if p.fast == nil {
				t.Fatal("the two-call path is off for pkcs11-spy.so")
			}
			for _, c := range cases {
				s := mustSigner(t, p, c.key)
				const n = 10
				var first []string
				mechs, calls := spyMechs(t, func() {
					for i := range n {
						m, _ := spyMechs(t, func() {
							if _, err := s.SignMessage(nil, msg, c.opts); err != nil {
								t.Fatal(err)
							}
						})
						if i == 0 {
							first = m
						}
					}
				})
				t.Logf("%s SignMessage %s: %.2f PKCS#11 calls per signature, with %v", c.key, optsName(c.opts), float64(calls)/n, first)
				if len(first) != 1 || first[0] != c.mech {
					t.Errorf("%s: the first SignMessage signed with %v, want %s alone", c.key, first, c.mech)
				}
				if calls != 2*n || len(mechs) != n {
					t.Errorf("%s: %d calls and %d C_SignInit for %d signatures, want 2 calls per signature", c.key, calls, len(mechs), n)
				}
			}
		})
	}
}

// TestRestrictedX509: a key restricted to hash-and-sign mechanisms signs
// certificates and CSRs with crypto/x509, which calls SignMessage; an
// algorithm the key does not allow fails with the reason.
func TestRestrictedX509(t *testing.T) {
	p := openRestricted(t)
	for _, c := range []struct {
		key  string
		algo x509.SignatureAlgorithm
	}{
		{"pss", x509.SHA256WithRSAPSS},
		{"pss", x509.SHA512WithRSAPSS},
		{"pkcs1", x509.SHA256WithRSA},
		{"hashsign", x509.SHA384WithRSA},
		{"hashsign", x509.SHA256WithRSAPSS},
	} {
		t.Run(c.key+"/"+c.algo.String(), func(t *testing.T) {
			s := mustSigner(t, p, c.key)
			selfSigned(t, s, c.algo)
			csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "csr"}, SignatureAlgorithm: c.algo}, s)
			if err != nil {
				t.Fatal(err)
			}
			parsed, err := x509.ParseCertificateRequest(csr)
			if err != nil || parsed.CheckSignature() != nil {
				t.Fatalf("CSR: %v", err)
			}
		})
	}
	_, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{SignatureAlgorithm: x509.SHA256WithRSA}, mustSigner(t, p, "pss"))
	if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), "CKA_ALLOWED_MECHANISMS") {
		t.Fatalf("a PSS-only key asked for SHA256WithRSA: %v", err)
	}
}

// TestRestrictedTLS: TLS 1.3 and 1.2 handshakes with keys restricted to
// hash-and-sign mechanisms, of the generation-bound and durable kinds.
func TestRestrictedTLS(t *testing.T) {
	p := openRestricted(t)
	for _, c := range []struct {
		key     string
		version uint16
		schemes []tls.SignatureScheme // nil: the default
	}{
		{"pss", tls.VersionTLS13, nil},
		{"pss", tls.VersionTLS13, []tls.SignatureScheme{tls.PSSWithSHA256}},
		{"pss", tls.VersionTLS13, []tls.SignatureScheme{tls.PSSWithSHA512}},
		{"pss", tls.VersionTLS12, []tls.SignatureScheme{tls.PSSWithSHA256}},
		{"pkcs1", tls.VersionTLS12, []tls.SignatureScheme{tls.PKCS1WithSHA256}},
		{"hashsign", tls.VersionTLS13, nil},
		{"hashsign", tls.VersionTLS12, nil},
		{"hashsign", tls.VersionTLS12, []tls.SignatureScheme{tls.PKCS1WithSHA384}},
	} {
		name := c.key + "/" + tls.VersionName(c.version)
		if c.schemes != nil {
			name += "/" + c.schemes[0].String()
		}
		t.Run(name, func(t *testing.T) {
			s := mustSigner(t, p, c.key)
			ds, err := p.DurableSigner(s.KeyRef())
			if err != nil {
				t.Fatal(err)
			}
			algo := x509.SHA256WithRSA
			if c.key == "pss" {
				algo = x509.SHA256WithRSAPSS
			}
			cert := selfSigned(t, s, algo)
			roots := x509.NewCertPool()
			roots.AddCert(cert)
			for kind, key := range map[string]crypto.Signer{"Signer": s, "DurableSigner": ds} {
				server := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key}}}
				client := &tls.Config{RootCAs: roots, ServerName: "hsm.test", MinVersion: c.version, MaxVersion: c.version}
				st, err := handshakeState(server, client, c.schemes)
				if err != nil {
					t.Fatalf("%s: %v", kind, err)
				}
				if st.Version != c.version {
					t.Fatalf("%s: negotiated %s", kind, tls.VersionName(st.Version))
				}
			}
		})
	}
}

// TestRestrictedProof: a durable key restricted to hash-and-sign
// mechanisms proves its private key with them, at first binding and again
// after a re-initialization (not let through as a key that cannot be
// challenged), and a proof against another public key fails.
func TestRestrictedProof(t *testing.T) {
	var logs lockedBuffer
	p := openRestricted(t, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	for _, key := range []string{"pss", "pkcs1"} {
		s := mustSigner(t, p, key)
		if res, err := s.k.prove(s.Public()); err != nil || res != provedMatch {
			t.Fatalf("%s: prove: %v, %v; want a match", key, res, err)
		}
		other := &rsaKey(t).PublicKey
		if res, err := s.k.prove(other); err != nil || res != provedMismatch {
			t.Fatalf("%s: prove against another key: %v, %v; want a mismatch", key, res, err)
		}
		ds, err := p.DurableSigner(KeyRef{Label: key})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Reinitialize(t.Context()); err != nil {
			t.Fatal(err)
		}
		opts := crypto.SignerOpts(pss256)
		if key == "pkcs1" {
			opts = crypto.SHA256
		}
		msg := []byte("after the re-initialization")
		sig, err := ds.SignMessage(nil, msg, opts)
		if err != nil || verify(ds.Public(), hashOf(crypto.SHA256, msg), sig, opts) != nil {
			t.Fatalf("%s: durable SignMessage: %v", key, err)
		}
		if ds.Generation() != p.Generation() {
			t.Fatalf("%s: bound in generation %d, the provider is in %d", key, ds.Generation(), p.Generation())
		}
	}
	if strings.Contains(logs.String(), "cannot be challenged") {
		t.Fatalf("a restricted key went unproved:\n%s", logs.String())
	}
}

// TestRestrictedKinds: every kind of key signs messages with a restricted
// key (SignMessage, SignMessageContext), and refuses its digests.
func TestRestrictedKinds(t *testing.T) {
	tok := softhsmtest.NewToken(t, "restrictedkinds")
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	ref := KeyRef{Label: "kinds", ID: []byte{7}}
	if _, err := p.GenerateKey(KeySpec{Type: RSA2048, Label: ref.Label, ID: ref.ID, Decrypt: true,
		AllowedMechanisms: []uint{pkcs11.CKM_SHA256_RSA_PKCS_PSS, pkcs11.CKM_RSA_PKCS_OAEP}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	g := openGroup(t, GroupConfig{Members: []Config{{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1}}})
	ks := kinds(t, g.Members()[0], ref, g, ref)
	msg := []byte("every kind")
	d := sha256.Sum256(msg)
	for name, k := range ks {
		m := k.(messageSigner)
		for how, sign := range map[string]func() ([]byte, error){
			"SignMessage":        func() ([]byte, error) { return m.SignMessage(nil, msg, pss256) },
			"SignMessageContext": func() ([]byte, error) { return m.SignMessageContext(t.Context(), msg, pss256) },
			"crypto.SignMessage": func() ([]byte, error) { return crypto.SignMessage(k, nil, msg, pss256) },
		} {
			sig, err := sign()
			if err != nil || verify(k.Public(), d[:], sig, pss256) != nil {
				t.Fatalf("%s: %s: %v", name, how, err)
			}
		}
		_, err := k.Sign(nil, d[:], pss256)
		if !errors.Is(err, ErrUnsupportedKey) || !strings.Contains(err.Error(), "SignMessage") {
			t.Errorf("%s: Sign: %v", name, err)
		}
		_, err = m.SignMessage(nil, msg, crypto.SHA256)
		if !errors.Is(err, ErrInvalidOptions) {
			t.Errorf("%s: SignMessage with PKCS #1 v1.5: %v", name, err)
		}
	}
}

// TestKeySpecAllowedMechanisms: the field and the attribute in
// PrivateAttributes restrict the key alike; both at once are refused.
func TestKeySpecAllowedMechanisms(t *testing.T) {
	tok := softhsmtest.NewToken(t, "allowed")
	p := openToken(t, tok)
	s, err := p.GenerateKey(KeySpec{Type: RSA2048, Label: "attr",
		PrivateAttributes: []Attribute{{pkcs11.CKA_ALLOWED_MECHANISMS, ulongs([]uint{pkcs11.CKM_SHA256_RSA_PKCS})}}})
	if err != nil {
		t.Fatal(err)
	}
	if !sameMechanisms(s.k.mechs.allowed, []uint{pkcs11.CKM_SHA256_RSA_PKCS}) {
		t.Fatalf("read back %s", mechList(s.k.mechs.allowed))
	}
	found := mustSigner(t, p, "attr")
	if !sameMechanisms(found.k.mechs.allowed, []uint{pkcs11.CKM_SHA256_RSA_PKCS}) {
		t.Fatalf("the lookup read %s", mechList(found.k.mechs.allowed))
	}
	_, err = p.GenerateKey(KeySpec{Type: RSA2048, Label: "both", AllowedMechanisms: []uint{pkcs11.CKM_SHA256_RSA_PKCS},
		PrivateAttributes: []Attribute{{pkcs11.CKA_ALLOWED_MECHANISMS, ulongs([]uint{pkcs11.CKM_SHA256_RSA_PKCS})}}})
	wantErr(t, err, ErrInvalidOptions)
	// An unrestricted key reads as unrestricted (SoftHSM gives an empty
	// list).
	if _, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "free"}); err != nil {
		t.Fatal(err)
	}
	if u := mustSigner(t, p, "free"); u.k.mechs.allowed != nil {
		t.Fatalf("an unrestricted key reads %s", mechList(u.k.mechs.allowed))
	}
}

// lockedBuffer is a bytes.Buffer for a logger that other goroutines may
// write to while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// BenchmarkSignMessage: Sign of a digest, SignMessage hashing here, and
// SignMessage with the token's hash-and-sign mechanism (a restricted
// key), side by side on RSA-2048 PSS (SHA-256) and, unrestricted, ECDSA
// P-256, for benchstat -col /how.
func BenchmarkSignMessage(b *testing.B) {
	msg := bytes.Repeat([]byte("tbsCertificate "), 64) // about a certificate's size
	d := sha256.Sum256(msg)
	for _, c := range []struct {
		tok, key, how string
		opts          crypto.SignerOpts
	}{
		{"shared", "p256", "Sign", crypto.SHA256},
		{"shared", "p256", "SignMessage", crypto.SHA256},
		{"shared", "rsa2048", "Sign", pss256},
		{"shared", "rsa2048", "SignMessage", pss256},
		{"restricted", "pss", "SignMessage", pss256},
	} {
		b.Run("key="+c.key+"/how="+c.how, func(b *testing.B) {
			var p *Provider
			if c.tok == "shared" {
				p = openShared(b, func(cfg *Config) { cfg.ProbeInterval = -1 })
			} else {
				p = openRestricted(b, func(cfg *Config) { cfg.ProbeInterval = -1 })
			}
			s := mustSigner(b, p, c.key)
			sign := func() ([]byte, error) { return s.SignMessage(nil, msg, c.opts) }
			if c.how == "Sign" {
				sign = func() ([]byte, error) { return s.Sign(nil, d[:], c.opts) }
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := sign(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
