package hsm

// Benchmarks side by side, on the same SoftHSM2 keys: raw miekg/pkcs11 (one
// session per goroutine, C_SignInit + C_Sign), crypto11 v1.6.2, and hsm;
// directly on SoftHSM and through p11-kit remoting (every call a socket
// round trip). make bench runs them and writes the README's table.

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha1"
	"crypto/sha256"
	"errors"
	"sync"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

var benchTok struct {
	sync.Mutex
	tok *softhsmtest.Token
}

// benchToken is a token with an EC P-256 key "ec" (id 01), an RSA-2048 key
// "rsa" (02) and an Ed25519 key "ed" (03).
func benchToken(b *testing.B) *softhsmtest.Token {
	benchTok.Lock()
	defer benchTok.Unlock()
	if benchTok.tok == nil {
		tok := softhsmtest.NewToken(b, "bench")
		tok.GenerateKey(b, softhsmtest.P256, []byte{1}, "ec")
		tok.GenerateKey(b, softhsmtest.RSA2048, []byte{2}, "rsa")
		tok.GenerateKey(b, softhsmtest.Ed25519, []byte{3}, "ed")
		benchTok.tok = tok
	}
	return benchTok.tok
}

// benchMech is one operation: a signature with opts, or, when dec is set,
// a decryption with dec of the ciphertext input.
type benchMech struct {
	name  string
	label string
	id    byte
	opts  crypto.SignerOpts
	input []byte
	mech  func() []*pkcs11.Mechanism // for raw miekg/pkcs11
	dec   crypto.DecrypterOpts
}

var digest32 = sha256.Sum256([]byte("benchmark"))

func benchMechs() []benchMech {
	pss := &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}
	return []benchMech{
		{"ECDSA-P256", "ec", 1, crypto.SHA256, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}
		}, nil},
		{"RSA2048-PKCS1v15", "rsa", 2, crypto.SHA256, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}
		}, nil},
		{"RSA2048-PSS", "rsa", 2, pss, digest32[:], func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_PSS, pkcs11.NewPSSParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, 32))}
		}, nil},
		{"Ed25519", "ed", 3, crypto.Hash(0), []byte("benchmark message"), func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(ckmEdDSA, nil)}
		}, nil},
		// SHA-1: what SoftHSM's CKM_RSA_PKCS_OAEP takes itself. The
		// ciphertext is made by BenchmarkOps.
		{"RSA2048-OAEP-decrypt", "rsa", 2, nil, nil, func() []*pkcs11.Mechanism {
			return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))}
		}, &rsa.OAEPOptions{Hash: crypto.SHA1}},
	}
}

// rawInput is what raw C_Sign gets for m (PKCS #1 v1.5 needs the DigestInfo).
func rawInput(m benchMech) []byte {
	if m.name == "RSA2048-PKCS1v15" {
		return append(append([]byte(nil), pkcs1Prefix[crypto.SHA256]...), digest32[:]...)
	}
	return m.input
}

// BenchmarkOps: every operation of benchMechs with every engine, serial
// and parallel, directly on SoftHSM and through p11-kit. Sub-benchmarks
// are named key=value, so that benchstat -col /eng puts the engines side by
// side (scripts/bench.sh).
func BenchmarkOps(b *testing.B) {
	tok := benchToken(b)
	mechs := benchMechs()
	for i, m := range mechs {
		if m.dec != nil {
			mechs[i].input = benchCiphertext(b, tok, m)
		}
	}
	for _, where := range []string{"direct", "remote"} {
		module := softhsmtest.SoftHSMModule
		var srv *softhsmtest.Server
		if where == "remote" {
			softhsmtest.RequireRemote(b)
			var err error
			if srv, err = softhsmtest.Serve(tok); err != nil {
				b.Fatal(err)
			}
			module = srv.Module()
		}
		for _, m := range mechs {
			if where == "remote" && m.name == "Ed25519" {
				continue // p11-kit 0.24's RPC does not carry CKM_EDDSA (TestEd25519ThroughRemoting)
			}
			for _, par := range []string{"serial", "parallel"} {
				for _, eng := range []string{"raw", "crypto11", "hsm"} {
					if eng == "crypto11" && m.name == "Ed25519" {
						continue // crypto11 has no Ed25519
					}
					b.Run("where="+where+"/op="+m.name+"/par="+par+"/eng="+eng, func(b *testing.B) {
						runOpBench(b, eng, par == "parallel", module, tok, m)
					})
				}
			}
		}
		if srv != nil {
			srv.Stop()
		}
	}
}

// benchCiphertext encrypts a secret to the public half of m's key.
func benchCiphertext(b *testing.B, tok *softhsmtest.Token, m benchMech) []byte {
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	return encryptTo(b, mustSigner(b, p, m.label).Public().(*rsa.PublicKey), []byte("a session key"), m.dec)
}

func runOpBench(b *testing.B, eng string, parallel bool, module string, tok *softhsmtest.Token, m benchMech) {
	var op func() error // safe for concurrent use
	var done func()
	switch eng {
	case "hsm":
		p, err := Open(Config{Path: module, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
		if err != nil {
			b.Fatal(err)
		}
		done = func() { p.Close() }
		if m.dec != nil {
			d, err := p.Decrypter(KeyRef{Label: m.label})
			if err != nil {
				b.Fatal(err)
			}
			op = func() error { _, err := d.Decrypt(nil, m.input, m.dec); return err }
			break
		}
		s, err := p.Signer(KeyRef{Label: m.label})
		if err != nil {
			b.Fatal(err)
		}
		op = func() error { _, err := s.Sign(nil, m.input, m.opts); return err }
	case "crypto11":
		c, err := crypto11.Configure(&crypto11.Config{Path: module, TokenLabel: tok.Label, Pin: tok.PIN})
		if err != nil {
			b.Fatal(err)
		}
		done = func() { c.Close() }
		s, err := c.FindKeyPair([]byte{m.id}, []byte(m.label))
		if err != nil || s == nil {
			b.Fatalf("crypto11 FindKeyPair: %v", err)
		}
		if m.dec != nil {
			d := s.(crypto.Decrypter)
			op = func() error { _, err := d.Decrypt(rand.Reader, m.input, m.dec); return err }
			break
		}
		op = func() error { _, err := s.Sign(rand.Reader, m.input, m.opts); return err }
	case "raw":
		r := openRaw(b, module, tok, m.label)
		done = r.close
		input := rawInput(m)
		mech := m.mech()
		op = func() error {
			s := r.session()
			defer r.put(s)
			if m.dec != nil {
				if err := r.ctx.DecryptInit(s, mech, r.key); err != nil {
					return err
				}
				_, err := r.ctx.Decrypt(s, input)
				return err
			}
			if err := r.ctx.SignInit(s, mech, r.key); err != nil {
				return err
			}
			_, err := r.ctx.Sign(s, input)
			return err
		}
	}
	defer done()
	if err := op(); err != nil { // warm up: sessions opened, key found
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	if parallel {
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := op(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		return
	}
	for b.Loop() {
		if err := op(); err != nil {
			b.Fatal(err)
		}
	}
}

// rawP11 is bare miekg/pkcs11: one session per goroutine (kept in a pool so
// that each is used by one goroutine at a time).
type rawP11 struct {
	ctx   *pkcs11.Ctx
	slot  uint
	key   pkcs11.ObjectHandle
	login pkcs11.SessionHandle
	idle  chan pkcs11.SessionHandle
	b     testing.TB
}

func openRaw(b *testing.B, module string, tok *softhsmtest.Token, label string) *rawP11 {
	r := openRawT(b, module, tok, label)
	r.b = b
	return r
}

func openRawT(b testing.TB, module string, tok *softhsmtest.Token, label string) *rawP11 {
	ctx := pkcs11.New(module)
	if ctx == nil {
		b.Fatal("pkcs11.New failed")
	}
	if err := ctx.Initialize(); err != nil {
		b.Fatal(err)
	}
	r := &rawP11{ctx: ctx, b: b, idle: make(chan pkcs11.SessionHandle, 64)}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		b.Fatal(err)
	}
	found := false
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && ti.Label == tok.Label {
			r.slot, found = s, true
		}
	}
	if !found {
		b.Fatal("raw: token not found")
	}
	if r.login, err = ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		b.Fatal(err)
	}
	if err := ctx.Login(r.login, pkcs11.CKU_USER, tok.PIN); err != nil {
		b.Fatal(err)
	}
	if err := ctx.FindObjectsInit(r.login, refTemplate(pkcs11.CKO_PRIVATE_KEY, nil, label)); err != nil {
		b.Fatal(err)
	}
	objs, _, err := ctx.FindObjects(r.login, 2)
	_ = ctx.FindObjectsFinal(r.login)
	if err != nil || len(objs) != 1 {
		b.Fatalf("raw: key %q: %v %d", label, err, len(objs))
	}
	r.key = objs[0]
	return r
}

func (r *rawP11) session() pkcs11.SessionHandle {
	select {
	case s := <-r.idle:
		return s
	default:
	}
	s, err := r.ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		r.b.Error(err)
	}
	return s
}

func (r *rawP11) put(s pkcs11.SessionHandle) {
	select {
	case r.idle <- s:
	default:
		_ = r.ctx.CloseSession(s)
	}
}

func (r *rawP11) close() {
	_ = r.ctx.Finalize()
	r.ctx.Destroy()
}

// BenchmarkRefused: what a stale key, and a key of a provider that is
// unavailable, cost. Each refusal returns a prebuilt error, so the loop
// checks it by identity (errors.Is, checked once before, would cost more
// than the refusal).
func BenchmarkRefused(b *testing.B) {
	for _, why := range []string{"stale", "unavailable"} {
		// Named like BenchmarkOps's engines, for benchstat -col /eng.
		b.Run("why="+why+"/eng=hsm", func(b *testing.B) {
			p := openShared(b, func(c *Config) { c.DisableAutoRecovery = true; c.ProbeInterval = -1 })
			s := mustSigner(b, p, "p256")
			target := ErrStaleKey
			if why == "stale" {
				if err := p.Reinitialize(b.Context()); err != nil {
					b.Fatal(err)
				}
			} else {
				// What the first CKR_DEVICE_ERROR of an operation does.
				p.markLost(s.Generation(), &Error{Op: "sign", Code: pkcs11.CKR_DEVICE_ERROR, Err: pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)})
				target = ErrUnavailable
			}
			_, want := s.Sign(nil, digest32[:], crypto.SHA256)
			if !errors.Is(want, target) {
				b.Fatalf("got %v, want %v", want, target)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Sign(nil, digest32[:], crypto.SHA256); err != want {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSessionKey: PKCS #1 v1.5 decryption with SessionKeyLen (the TLS
// 1.2 RSA key exchange) of a valid ciphertext and of ciphertexts whose
// padding is bad or whose key has the wrong length, side by side: the same
// calls and the same path, so the same time within noise.
func BenchmarkSessionKey(b *testing.B) {
	tok := benchToken(b)
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	d, err := p.Decrypter(KeyRef{Label: "rsa"})
	if err != nil {
		b.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	key := make([]byte, 32)
	for _, ct := range []struct {
		name string
		ct   []byte
	}{
		{"valid", encryptTo(b, pub, key, nil)},
		{"bad-padding", benchBadPadding(b, pub)},
		{"wrong-length", encryptTo(b, pub, key[:16], nil)},
	} {
		b.Run("ct="+ct.name, func(b *testing.B) {
			//lint:ignore SA1019 crypto/tls still passes these options for the TLS 1.2 RSA key exchange; the benchmark measures that path.
			opts := &rsa.PKCS1v15DecryptOptions{SessionKeyLen: len(key)}
			for b.Loop() {
				if _, err := d.Decrypt(nil, ct.ct, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchBadPadding is a random number below the modulus: its decryption
// starts 0x00 0x02 with probability about 2^-16.
func benchBadPadding(b *testing.B, pub *rsa.PublicKey) []byte {
	n, err := rand.Int(rand.Reader, pub.N)
	if err != nil {
		b.Fatal(err)
	}
	return n.FillBytes(make([]byte, pub.Size()))
}
