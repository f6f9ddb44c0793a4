# The two commands of the README: `make demo` and `make test`.
GO ?= go
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
# The adapters (stepkms, hsmjwt, hsmprom), the comparisons with crypto11
# (compare) and the program of make interop (interop): nested modules with
# go.mods of their own, so that users of the core never download their
# dependencies.
NESTED := $(patsubst %/go.mod,%,$(wildcard */go.mod))

.PHONY: demo test deps check fuzz bench soak soak-group conformance interop stepca

## demo: create a SoftHSM2 token, sign, re-initialize, kill and restart a "network HSM", recover
demo: deps
	$(GO) run ./cmd/hsmdemo

## test: the whole suite, race detector on (real SoftHSM2 and p11-kit, nothing skips), then each nested module's, then the core's again under GOEXPERIMENT=cgocheck2 (every Go pointer stored into C memory checked: the two-call path hands Go memory to C)
test: deps
	$(GO) test -race -count=1 -timeout 9m ./...
	@set -e; for m in $(NESTED); do echo "== $$m"; (cd $$m && $(GO) test -race -count=1 -timeout 5m ./...); done
	GOEXPERIMENT=cgocheck2 $(GO) test -count=1 -timeout 9m ./...

## deps: install softhsm2, p11-kit and opensc when missing
deps:
	@sh scripts/install-deps.sh

## check: go mod tidy -diff, go vet, gofmt, staticcheck (the core and each nested module)
check:
	$(GO) mod tidy -diff
	$(GO) vet ./...
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) run $(STATICCHECK) ./...
	@set -e; for m in $(NESTED); do echo "== $$m"; (cd $$m && $(GO) mod tidy -diff && $(GO) vet ./... && $(GO) run $(STATICCHECK) ./...); done

## fuzz: run the fuzz targets for a while each
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzUnpadOAEP -fuzztime 30s .
	$(GO) test -run '^$$' -fuzz FuzzParseURI -fuzztime 30s .

## bench: benchmarks, calls and instructions per operation (raw miekg/pkcs11, crypto11, hsm) into docs/performance.md; about 20 minutes
bench: deps
	@sh scripts/install-deps.sh valgrind
	bash scripts/bench.sh

## soak: the chaos soak, 60 s with an outage about every 2 s (a short one runs in make test)
soak: deps
	$(GO) run ./cmd/hsmcheck soak -duration 60s -outage-every 2s

## soak-group: the chaos soak of an hsm.Group of 3 members, 60 s, each member down about every 2 s, one always up
soak-group: deps
	$(GO) run ./cmd/hsmcheck soak -members 3 -duration 60s -outage-every 2s

## conformance: hsmcheck conform on SoftHSM2, p11-kit remoting, NSS softokn, tpm2-pkcs11 (swtpm) and openCryptoki; matrix in /tmp/conf-matrix.txt (HSM_CONF_DOC=docs/modules.md make conformance writes it into docs/modules.md too)
conformance: deps
	bash scripts/conformance.sh

## interop: real clients on the library's keys (docs/interop.md): openssl s_client and curl (TLS 1.3, TLS 1.2, RSA key exchange), openssl verify and req -verify, npm's jose on hsmjwt's JWTs; each must accept good input and refuse it broken; installs openssl, curl, nodejs and npm when missing
interop: deps
	@sh scripts/install-deps.sh openssl curl node npm
	bash scripts/interop.sh

## stepca: smallstep's step-ca as released (github.com/smallstep/certificates from the module proxy, unpatched) built with stepkms.Register(), run on a SoftHSM token behind p11-kit: issue, kill and restart the HSM, issue, reload with SIGHUP, refused reloads, shutdown (stepkms/README.md); its own module, checked here (tidy, vet, staticcheck); the step-ca build is cached in GOCACHE (cold: minutes, cached: seconds)
STEPCA_DIR := stepkms/internal/stepca
stepca: deps
	cd $(STEPCA_DIR) && $(GO) mod tidy -diff && $(GO) vet -tags noyubikey ./... && $(GO) run $(STATICCHECK) -tags noyubikey ./...
	cd $(STEPCA_DIR) && $(GO) test -tags noyubikey -count=1 -timeout 20m -v ./...
