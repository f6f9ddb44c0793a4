// Command step-ca is smallstep's step-ca, as its own cmd/step-ca builds it
// (github.com/smallstep/certificates, unpatched, from the module proxy),
// with one line more: stepkms.Register(), which makes every pkcs11 KMS of
// ca.json a stepkms one. The test of this module builds and runs it. What
// it leaves out of upstream's main is cosmetic (help templates, version
// and build time from the Makefile); it keeps upstream's profiler on
// STEP_PROF_ADDR, whose /debug/pprof/heap?gc=1 lets the test collect
// garbage in step-ca.
//
// Build it with -tags noyubikey unless libpcsclite's headers are installed,
// as upstream does without them.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	// Server profiler, as upstream: served on STEP_PROF_ADDR when set.
	_ "net/http/pprof"

	"github.com/urfave/cli"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/commands"
	"github.com/smallstep/cli-utils/command"
	"github.com/smallstep/cli-utils/command/version"
	"github.com/smallstep/cli-utils/step"
	"github.com/smallstep/cli-utils/ui"
	"go.step.sm/crypto/pemutil"

	"github.com/ce46d8f2/hsm/stepkms"

	// The KMSes and CASes upstream's main enables.
	_ "go.step.sm/crypto/kms/awskms"
	_ "go.step.sm/crypto/kms/azurekms"
	_ "go.step.sm/crypto/kms/cloudkms"
	_ "go.step.sm/crypto/kms/pkcs11"
	_ "go.step.sm/crypto/kms/softkms"
	_ "go.step.sm/crypto/kms/sshagentkms"
	_ "go.step.sm/crypto/kms/tpmkms"
	_ "go.step.sm/crypto/kms/yubikey"

	_ "github.com/smallstep/certificates/cas/cloudcas"
	_ "github.com/smallstep/certificates/cas/softcas"
	_ "github.com/smallstep/certificates/cas/stepcas"
	_ "github.com/smallstep/certificates/cas/vaultcas"
)

// Version is what step-ca --version prints.
var Version = "stepkms-test"

func init() {
	step.Set("Smallstep CA", Version, "N/A")
	authority.GlobalVersion.Version = Version
	pemutil.PromptPassword = func(msg string) ([]byte, error) {
		return ui.PromptPassword(msg)
	}
}

func main() {
	if err := step.Init(); err != nil {
		fmt.Fprintln(os.Stderr, err.Error())
		os.Exit(1)
	}
	ui.Init()

	// After the init of go.step.sm/crypto/kms/pkcs11 (imported above), which
	// registers step's own pkcs11 backend.
	stepkms.Register()

	cli.VersionPrinter = func(c *cli.Context) { version.Command(c) }
	app := cli.NewApp()
	app.Name = "step-ca"
	app.HelpName = "step-ca"
	app.Version = step.Version()
	app.Usage = "an online certificate authority for secure automated certificate management"
	app.Flags = append(app.Flags, commands.AppCommand.Flags...)
	app.Flags = append(app.Flags, cli.HelpFlag)
	app.Writer = os.Stdout
	app.ErrWriter = os.Stderr
	app.Commands = command.Retrieve()

	if addr := os.Getenv("STEP_PROF_ADDR"); addr != "" {
		go func() {
			srv := http.Server{Addr: addr, ReadHeaderTimeout: 15 * time.Second}
			log.Println(srv.ListenAndServe())
		}()
	}
	app.Action = func(_ *cli.Context) error {
		// As upstream: run the top action as a subcommand.
		set := flag.NewFlagSet(app.Name, flag.ContinueOnError)
		_ = set.Parse(os.Args)
		ctx := cli.NewContext(app, set, nil)
		return commands.AppCommand.Run(ctx)
	}
	if err := app.Run(os.Args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		ui.Reset()
		os.Exit(1)
	}
	ui.Reset()
}
