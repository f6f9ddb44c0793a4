package hsmprom_test

import (
	"bufio"
	"crypto"
	"crypto/sha256"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmprom"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// exampleConfig returns the Config of a fresh SoftHSM2 token with an EC
// P-256 key labelled "tls". In an application the Config comes from its
// configuration.
func exampleConfig() hsm.Config {
	tok, err := softhsmtest.CreateToken("example")
	if err != nil {
		log.Fatal(err)
	}
	if err := tok.Generate(softhsmtest.P256, []byte{1}, "tls"); err != nil {
		log.Fatal(err)
	}
	return hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
}

// Serve a provider's metrics on /metrics, labelled hsm="primary" so that
// more providers can share the registry.
func Example() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	reg := prometheus.NewRegistry()
	prometheus.WrapRegistererWith(prometheus.Labels{"hsm": "primary"}, reg).MustRegister(hsmprom.NewCollector(p))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(mux) // in production: http.ListenAndServe(":9100", mux)
	defer srv.Close()

	key, err := p.Signer(hsm.KeyRef{Label: "tls"})
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	if _, err := key.Sign(nil, digest[:], crypto.SHA256); err != nil {
		log.Fatal(err)
	}

	// What Prometheus scrapes, in part.
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "hsm_state{") || strings.HasPrefix(line, "hsm_generation ") ||
			strings.HasPrefix(line, "hsm_generation{") || strings.HasPrefix(line, `hsm_operation_duration_seconds_count{hsm="primary",op="sign"}`) {
			fmt.Println(line)
		}
	}
	// Output:
	// hsm_generation{hsm="primary"} 1
	// hsm_operation_duration_seconds_count{hsm="primary",op="sign"} 1
	// hsm_state{hsm="primary",state="closed"} 0
	// hsm_state{hsm="primary",state="failed"} 0
	// hsm_state{hsm="primary",state="healthy"} 1
	// hsm_state{hsm="primary",state="reinitializing"} 0
	// hsm_state{hsm="primary",state="unavailable"} 0
}
