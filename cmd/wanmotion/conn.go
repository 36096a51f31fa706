package main

// Pool connections and credentials for the CLI (pool, migrate).
//
// Passwords never come from a flag value. Sources, in order:
//  1. an environment variable (WANMOTION_PASSWORD for `pool`,
//     WANMOTION_FROM_PASSWORD / WANMOTION_TO_PASSWORD for `migrate`);
//  2. a credentials file (--credentials FILE, else
//     $XDG_CONFIG_HOME/wanmotion/credentials or ~/.config/wanmotion/credentials
//     when it exists), which must not be readable by group or others;
//  3. a prompt on the terminal (not echoed), when stdin is a terminal.

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/term"

	"github.com/wanmotion/wanmotion/xapi"
)

// Environment variables holding passwords.
const (
	EnvPassword     = "WANMOTION_PASSWORD"
	EnvFromPassword = "WANMOTION_FROM_PASSWORD"
	EnvToPassword   = "WANMOTION_TO_PASSWORD"
)

// errNoPassword: no source gave a password.
var errNoPassword = errors.New("no password")

// errCredentialsMode: the credentials file is readable by others.
var errCredentialsMode = errors.New("credentials file is readable by group or others")

// Terminal access, replaceable in tests.
var (
	stdinIsTerminal = func() bool { return term.IsTerminal(int(os.Stdin.Fd())) }
	readPassword    = func(prompt string, w io.Writer) (string, error) {
		fmt.Fprint(w, prompt)
		b, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(w)
		return string(b), err
	}
)

// passwordFlagNames are flags people try; they are refused with advice.
var passwordFlagNames = []string{"password", "pass", "passwd", "pw", "p", "from-password", "to-password", "pwd"}

// refusePasswordFlags returns a usage error when args hold a password flag.
func refusePasswordFlags(args []string, envs ...string) error {
	for _, a := range args {
		if a == "--" {
			return nil
		}
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name := strings.TrimLeft(a, "-")
		name, _, _ = strings.Cut(name, "=")
		for _, p := range passwordFlagNames {
			if name == p {
				return fmt.Errorf("%w: --%s: passwords are never taken from flags (they end up in shell history and ps); use %s, a credentials file (--credentials) or the prompt",
					errUsage, name, strings.Join(envs, " / "))
			}
		}
	}
	return nil
}

// tlsFlags are the TLS options shared by every pool connection.
type tlsFlags struct {
	insecure    bool
	caFile      string
	thumbprints stringList
}

func (t *tlsFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&t.insecure, "insecure", false, "do not verify the pools' TLS certificates (labs only)")
	fs.StringVar(&t.caFile, "ca-file", "", "PEM file of CA or host certificates to trust")
	fs.Var(&t.thumbprints, "thumbprint", "pin a host certificate by SHA-256 thumbprint (repeatable)")
}

func (t tlsFlags) options() xapi.TLSOptions {
	return xapi.TLSOptions{Insecure: t.insecure, CAFile: t.caFile, Thumbprints: append([]string{}, t.thumbprints...)}
}

func (t tlsFlags) check() error {
	if t.insecure && (t.caFile != "" || len(t.thumbprints) > 0) {
		return fmt.Errorf("%w: --insecure cannot be combined with --ca-file or --thumbprint", errUsage)
	}
	return nil
}

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// defaultCredentialsFile is $XDG_CONFIG_HOME/wanmotion/credentials or
// ~/.config/wanmotion/credentials ("" when no home is known).
func defaultCredentialsFile() string {
	if d := os.Getenv("XDG_CONFIG_HOME"); d != "" {
		return filepath.Join(d, "wanmotion", "credentials")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".config", "wanmotion", "credentials")
	}
	return ""
}

// credentialsFromFile finds the password of user at poolURL in a
// credentials file. Format: one entry per line, "URL USER PASSWORD"
// separated by blanks; the password is the rest of the line (it may hold
// blanks, trailing blanks are kept, a trailing "\r" is not). URL is compared
// by scheme, host and port (a path is ignored); a bare host or host:port
// matches any scheme. Lines starting with '#' and empty lines are skipped.
// explicit says the file was named by the user: then it must exist.
func credentialsFromFile(path string, explicit bool, poolURL, user string) (string, bool, error) {
	if path == "" {
		return "", false, nil
	}
	fi, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("credentials file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", false, fmt.Errorf("%w: %s has mode %04o; run: chmod 600 %s", errCredentialsMode, path, fi.Mode().Perm(), path)
	}
	f, err := os.Open(path)
	if err != nil {
		return "", false, fmt.Errorf("credentials file: %w", err)
	}
	defer f.Close()
	want, err := url.Parse(poolURL)
	if err != nil {
		return "", false, fmt.Errorf("%w: bad URL %q", errUsage, poolURL)
	}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSuffix(sc.Text(), "\r")
		trimmed := strings.TrimLeft(line, " \t")
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		u, rest, ok1 := cutField(trimmed)
		usr, pw, ok2 := cutField(rest)
		if !ok1 || !ok2 || pw == "" {
			return "", false, fmt.Errorf("credentials file %s line %d: want \"URL USER PASSWORD\"", path, n)
		}
		if usr == user && sameEndpoint(u, want) {
			return pw, true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", false, fmt.Errorf("credentials file: %w", err)
	}
	return "", false, nil
}

// cutField splits off the first blank-separated field; the rest has its
// leading blanks removed.
func cutField(s string) (string, string, bool) {
	i := strings.IndexAny(s, " \t")
	if i < 0 {
		return s, "", s != ""
	}
	return s[:i], strings.TrimLeft(s[i:], " \t"), true
}

func sameEndpoint(entry string, want *url.URL) bool {
	if !strings.Contains(entry, "://") {
		return entry == want.Host || entry == want.Hostname()
	}
	u, err := url.Parse(entry)
	if err != nil {
		return false
	}
	return strings.EqualFold(u.Scheme, want.Scheme) && strings.EqualFold(u.Host, want.Host)
}

// credSource says where to look for one pool's password.
type credSource struct {
	env       string // environment variable
	file      string // credentials file ("" = default path)
	fileGiven bool   // file named by --credentials
	label     string // "source pool" ...
}

// password finds the password for user at poolURL.
func (c credSource) password(poolURL, user string, stderr io.Writer) (string, error) {
	if v, ok := os.LookupEnv(c.env); ok && v != "" {
		return v, nil
	}
	file := c.file
	if file == "" {
		file = defaultCredentialsFile()
	}
	pw, ok, err := credentialsFromFile(file, c.fileGiven, poolURL, user)
	if err != nil {
		return "", err
	}
	if ok {
		return pw, nil
	}
	if stdinIsTerminal() {
		pw, err := readPassword(fmt.Sprintf("password for %s at %s (%s): ", user, poolURL, c.label), stderr)
		if err != nil {
			return "", fmt.Errorf("read password: %w", err)
		}
		if pw == "" {
			return "", fmt.Errorf("%w for %s at %s", errNoPassword, user, poolURL)
		}
		return pw, nil
	}
	return "", fmt.Errorf("%w for %s at %s: set %s, add it to a credentials file (%s) or run on a terminal",
		errNoPassword, user, poolURL, c.env, file)
}

// connect logs in to a pool.
func connect(ctx context.Context, poolURL, user, password string, tf tlsFlags, log hclog.Logger) (*xapi.Client, error) {
	c, err := xapi.New(xapi.Config{URL: poolURL, Username: user, Password: password, TLS: tf.options(), Logger: log})
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUsage, err)
	}
	if err := c.Login(ctx); err != nil {
		if errors.Is(err, xapi.ErrSessionAuthenticationFailed) {
			return nil, fmt.Errorf("log in to %s as %s: wrong user name or password (check the pool's password in the environment, the credentials file or at the prompt; see 'Passwords and credentials' in docs/cli.md): %w", poolURL, user, err)
		}
		return nil, fmt.Errorf("log in to %s as %s: %w", poolURL, user, err)
	}
	return c, nil
}

// checkLogLevel refuses a --log-level hclog does not know (it would
// silently log nothing).
func checkLogLevel(level string) error {
	if level == "" || hclog.LevelFromString(level) != hclog.NoLevel {
		return nil
	}
	return fmt.Errorf("%w: --log-level %q: want trace, debug, info, warn or error", errUsage, level)
}

// newCLILogger logs to stderr at level (default warn).
func newCLILogger(level string, stderr io.Writer) hclog.Logger {
	if level == "" {
		level = "warn"
	}
	return hclog.New(&hclog.LoggerOptions{Name: "wanmotion", Level: hclog.LevelFromString(level), Output: stderr})
}
