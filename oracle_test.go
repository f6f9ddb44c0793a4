//lint:file-ignore SA1019 PKCS #1 v1.5 decryption is part of crypto.Decrypter; these tests need v1.5 ciphertexts.

package hsm

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"log/slog"
	"maps"
	"math/big"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a logger and a test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestNoPaddingOracle: with SessionKeyLen (what crypto/tls does for the
// TLS 1.2 RSA key exchange), a ciphertext whose padding is bad, or whose
// key has the wrong length, takes the same PKCS#11 calls, counted by
// pkcs11-spy, as a good one: C_DecryptInit and C_Decrypt, no session
// closed or opened, no probe, no log line. The valid one yields the key,
// the others as many random bytes, and no error for any.
func TestNoPaddingOracle(t *testing.T) {
	var logs syncBuffer
	p := openSpy(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	const keyLen = 32
	secret := bytes.Repeat([]byte{0x5a}, keyLen)
	short, err := rsa.EncryptPKCS1v15(rand.Reader, pub, secret[:16])
	if err != nil {
		t.Fatal(err)
	}
	// Bad padding: a random number below the modulus (0x00 0x02 ... with
	// probability about 2^-16).
	garbage := func() []byte {
		n, err := rand.Int(rand.Reader, pub.N)
		if err != nil {
			t.Fatal(err)
		}
		return n.FillBytes(make([]byte, pub.Size()))
	}
	// A valid block type 1 (signature padding): 0x00 0x01 0xff... 0x00 key.
	em := append(append([]byte{0, 1}, bytes.Repeat([]byte{0xff}, pub.Size()-3-keyLen)...), 0)
	em = append(em, secret...)
	type1 := new(big.Int).Exp(new(big.Int).SetBytes(em), big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, pub.Size()))

	opts := &rsa.PKCS1v15DecryptOptions{SessionKeyLen: keyLen}
	cases := []struct {
		name  string
		ct    func() []byte
		valid bool
	}{
		{"valid", func() []byte { return encryptTo(t, pub, secret, nil) }, true},
		{"bad padding", garbage, false},
		{"block type 1", func() []byte { return type1 }, false},
		{"16-byte key", func() []byte { return short }, false},
	}
	// Warm up: the session is open, the mechanism known.
	if _, err := d.Decrypt(nil, encryptTo(t, pub, secret, nil), opts); err != nil {
		t.Fatal(err)
	}
	logs.b.Reset()
	const n = 50
	probes := p.Stats().Probes
	var first map[string]int
	for _, c := range cases {
		cts := make([][]byte, n)
		for i := range cts {
			cts[i] = c.ct()
		}
		var took time.Duration
		calls := callsByName(t, func() {
			start := time.Now()
			for _, ct := range cts {
				out, err := d.Decrypt(nil, ct, opts)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				if len(out) != keyLen || bytes.Equal(out, secret) != c.valid {
					t.Fatalf("%s: got %x (valid: %v)", c.name, out, c.valid)
				}
			}
			took = time.Since(start)
		})
		t.Logf("%-12s %d decryptions: PKCS#11 calls %v, %v each", c.name, n, calls, (took / n).Round(time.Microsecond))
		if calls["C_DecryptInit"] != n || calls["C_Decrypt"] != n || len(calls) != 2 {
			t.Errorf("%s: calls %v for %d decryptions; want exactly %d C_DecryptInit and %d C_Decrypt", c.name, calls, n, n, n)
		}
		if first == nil {
			first = calls
		} else if !maps.Equal(calls, first) {
			t.Errorf("%s: calls %v, but %s made %v", c.name, calls, cases[0].name, first)
		}
	}
	if st := p.Stats(); st.Probes != probes || st.Failed != 0 || len(st.ErrorsByCode) != 0 {
		t.Errorf("decryptions changed the health bookkeeping: %d probes (before %d), %d failed, %v", st.Probes, probes, st.Failed, st.ErrorsByCode)
	}
	if l := logs.String(); l != "" {
		t.Errorf("decryptions logged:\n%s", l)
	}
	// Without SessionKeyLen, bad padding is an error matching ErrDecryption,
	// still without a probe.
	_, err = d.Decrypt(nil, garbage(), nil)
	wantErr(t, err, ErrDecryption)
	if st := p.Stats(); st.Probes != probes {
		t.Errorf("a bad ciphertext started a probe")
	}
}
